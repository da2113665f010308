"""FID Inception-v3 in pure torch, on random weights: key names, shapes, determinism, batching."""

import numpy as np
import pytest
import torch

from metrics import inception as inc


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return inc.FIDInceptionV3().eval()


def images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_state_dict_matches_pytorch_fid_layout(net):
    sd = net.state_dict()
    # torchvision Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's FID blocks:
    # 94 conv+bn units (conv.weight + bn weight/bias/running_mean/running_var/num_batches_tracked)
    assert len(sd) == 94 * 6 + 2
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    for key, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
                       "Conv2d_4a_3x3.bn.running_var": (192,),
                       "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                       "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                       "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                       "Mixed_7c.branch3x3dbl_3b.bn.bias": (384,),
                       "fc.weight": (1008, 2048)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_weight_file_round_trip_strict(net, tmp_path):
    path = tmp_path / inc.WEIGHTS_FILE
    torch.save({k: v for k, v in net.state_dict().items() if "num_batches" not in k}, path)
    loaded, sha = inc.load_inception(path)  # weights_only=True, strict (old files lack counters)
    assert len(sha) == 64 and sha == inc.sha256_of(path)
    x = inc.preprocess(images(1), "legacy_pytorch", size=96)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x))


def test_features_shape_determinism_batch_invariance(net):
    imgs = images(3)
    ext1 = inc.InceptionExtractor(net, resize="clean", batch_size=1)
    ext3 = inc.InceptionExtractor(net, resize="clean", batch_size=3)
    f1 = ext1(imgs)
    assert f1.shape == (3, 2048) and f1.dtype == np.float64
    assert np.isfinite(f1).all() and f1.std() > 0
    np.testing.assert_array_equal(f1, ext1(imgs))
    np.testing.assert_allclose(ext3(imgs), f1, rtol=1e-4, atol=1e-7)
    assert ext1.name.endswith("@random")


def test_clean_resize_is_pil_bicubic_float():
    from PIL import Image

    img = images(1, size=16)
    out = inc.resize_clean(img, size=299)
    assert out.shape == (1, 299, 299, 3) and out.dtype == np.float32
    ch = Image.fromarray(img[0, :, :, 1].astype(np.float32), mode="F").resize((299, 299),
                                                                              Image.BICUBIC)
    np.testing.assert_array_equal(out[0, :, :, 1], np.asarray(ch))
    x = inc.preprocess(img, "clean")
    assert x.shape == (1, 3, 299, 299)
    const = np.full((1, 8, 8, 3), 255, np.uint8)
    assert float(inc.preprocess(const, "clean").max()) == pytest.approx(127 / 128, abs=1e-5)
    assert float(inc.preprocess(const, "legacy_pytorch").max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown resize"):
        inc.preprocess(const, "bogus")


def test_weight_lookup_order(monkeypatch, tmp_path):
    from harness.cache import CACHE_ENV

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path))
    paths = inc.candidate_paths()
    assert paths[0] == tmp_path / inc.WEIGHTS_FILE
    assert inc.find_weights() is None
    (tmp_path / ".cache" / "diffbench").mkdir(parents=True)
    (tmp_path / ".cache" / "diffbench" / inc.WEIGHTS_FILE).write_bytes(b"x")
    assert inc.find_weights() == tmp_path / ".cache" / "diffbench" / inc.WEIGHTS_FILE
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # the one cache root of diffbench
    assert inc.candidate_paths()[1] == tmp_path / "cache" / inc.WEIGHTS_FILE
