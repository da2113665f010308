"""`cmmd` on a user's CLIP: a tiny random transformers CLIPModel saved offline, the value by
hand, the reference implementation's arithmetic, missing model / reference notes."""

import numpy as np
import pytest
import torch

from harness.metric import Observation
from metrics import cmmd as cm
from metrics import frechet as fr
from metrics import kid as kd
from metrics.clip_score import _as_tensor
from tests.metrics.contract import MetricContract, cell_context
from tests.metrics.test_frechet import integer_features, random_images
from tests.metrics.test_reward import images, save_tiny_clip


def embed_by_hand(folder, imgs):
    """The reference code's embedding written out: [0, 1], bicubic (antialiased) resize to the
    model's input size, the model's mean / std, projected image embedding, L2-normalised."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    proc = CLIPImageProcessor.from_pretrained(folder)
    size = proc.crop_size["height"]
    x = torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic",
                                        align_corners=False, antialias=True)
    x = (x - torch.tensor(proc.image_mean).view(1, 3, 1, 1)) / torch.tensor(
        proc.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        e = _as_tensor(model.get_image_features(pixel_values=x)).double()
    return (e / e.norm(dim=-1, keepdim=True)).numpy()


def unit_rows(seed, n, d=16):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def clip_dir(tmp_path):
    save_tiny_clip(tmp_path / "clip", seed=1)
    return tmp_path / "clip"


def test_value_equals_rbf_mmd_of_embeddings_by_hand(clip_dir, tmp_path):
    ref = unit_rows(0, 20)
    np.savez(tmp_path / "ref.npz", features=ref)
    ctx = cell_context({"cmmd": {"clip_model": str(clip_dir),
                                 "reference": str(tmp_path / "ref.npz")}})
    metric = cm.CMMD.for_cell(ctx)
    metric.n_boot = 20
    x = images(6, seed=2)
    metric.update(Observation(n_images=3, images=torch.from_numpy(x[:3]), prompts=["a"] * 3))
    metric.update(Observation(n_images=3, images=torch.from_numpy(x[3:]), prompts=["a"] * 3))
    out = metric.compute()
    fake = embed_by_hand(clip_dir, x)
    assert np.allclose(np.linalg.norm(fake, axis=1), 1.0)
    assert out["cmmd"] == pytest.approx(cm.rbf_mmd(ref, fake), rel=1e-5)
    assert out["cmmd"] > 0 and "cmmd_std" not in out
    assert out["cmmd_ci_lo"] is not None and out["cmmd_ci_hi"] is not None
    assert out["cmmd_reference"] == "ref.npz" and out["cmmd_note"] == ""
    assert out["cmmd_extractor"].startswith(str(clip_dir) + "@")
    assert out["cmmd_warning"].startswith("n=6 < ")


def test_rbf_mmd_matches_the_reference_implementations_arithmetic():
    """clip-mmd (a torch port of google-research/cmmd's distance.py): mmd and mmd_efficient."""
    calc = pytest.importorskip("clip_mmd.calculation",
                               reason="clip-mmd not installed (pip install --no-deps clip-mmd)")
    x, y = unit_rows(1, 30, 24), unit_rows(2, 17, 24) + 0.1
    ours = cm.rbf_mmd(x, y)
    ref = float(calc.mmd(torch.from_numpy(x), torch.from_numpy(y)))
    eff = calc.mmd_efficient(x, y, precision=torch.float64, low_mem=True, coeff_bs=7)
    assert ours == pytest.approx(ref, rel=1e-9) and ours == pytest.approx(eff, rel=1e-9)
    assert ours > 0.1


def test_missing_model_path_is_one_line_note(tmp_path):
    np.savez(tmp_path / "ref.npz", features=unit_rows(0, 4))
    missing = tmp_path / "no-clip"
    metric = cm.CMMD.for_cell(cell_context({"cmmd": {"clip_model": str(missing),
                                                     "reference": str(tmp_path / "ref.npz")}}))
    metric.update(Observation(n_images=2, images=torch.from_numpy(images(2))))
    out = metric.compute()
    assert out["cmmd"] is None and metric.features == []
    note = out["cmmd_note"]
    assert "\n" not in note
    assert note.startswith(f"cmmd not measured: [metric_options.cmmd] clip_model = '{missing}' "
                           f"not found (looked in {missing};")


def test_default_model_not_in_the_hf_cache_is_one_line_note(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = cm.CMMD.for_cell(cell_context({})).compute()
    note = out["cmmd_note"]
    assert out["cmmd"] is None and "\n" not in note
    assert f"clip_model = '{cm.DEFAULT_CLIP}' not found" in note
    assert str(tmp_path / "hub" / "models--openai--clip-vit-large-patch14-336") in note


def test_missing_or_absent_reference_is_one_line_note(clip_dir, tmp_path):
    ctx = cell_context({"cmmd": {"clip_model": str(clip_dir),
                                 "reference": str(tmp_path / "nope.npz")}})
    note = cm.CMMD.for_cell(ctx).compute()["cmmd_note"]
    assert "\n" not in note
    assert note.startswith("cmmd not measured: [metric_options.cmmd] reference: reference "
                           f"features {tmp_path / 'nope.npz'}: cannot read")
    metric = cm.CMMD.for_cell(cell_context({"cmmd": {"clip_model": str(clip_dir)}}))
    metric.update(Observation(n_images=2, images=torch.from_numpy(images(2))))
    out = metric.compute()
    assert out["cmmd"] is None and metric.features == []
    assert "give [metric_options.cmmd] reference = 'features.npz'" in out["cmmd_note"]


def test_embedded_model_uses_the_world_embedded_with_that_clip(monkeypatch, clip_dir, tmp_path):
    from harness.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    world = images(10, seed=9, h=32, w=32)
    calls = []

    def world_images(n=fr.WORLD_REFERENCE_N, **kw):
        calls.append(n)
        return world

    monkeypatch.setattr(kd, "world_images", world_images)
    ctx = cell_context({"cmmd": {"clip_model": str(clip_dir)}}, embedded=True)
    metric = cm.CMMD.for_cell(ctx)
    metric.n_boot = 10
    x = images(4, seed=3)
    metric.update(Observation(n_images=4, images=torch.from_numpy(x)))
    out = metric.compute()
    assert out["cmmd_reference"] == f"{fr.WORLD_DATASET}:n{fr.WORLD_REFERENCE_N}"
    expected = cm.rbf_mmd(embed_by_hand(clip_dir, world), embed_by_hand(clip_dir, x))
    assert out["cmmd"] == pytest.approx(expected, rel=1e-5)
    cm.CMMD.for_cell(ctx)  # the world's embeddings come from the cache the second time
    assert calls == [fr.WORLD_REFERENCE_N]


def _real():
    return integer_features(random_images(99, n=50))


class TestCMMDContract(MetricContract):
    """`cmmd` with an injected extractor; for_cell reads a tiny CLIP saved offline."""

    metric_name = "cmmd"

    def make_metric(self):
        return cm.CMMD(integer_features, _real(), "ints", "ints", n_boot=10)

    def observations(self):
        return [Observation(n_images=4, images=random_images(s, n=4)) for s in (1, 2, 3)]

    def option_values(self, tmp_path):
        save_tiny_clip(tmp_path / "clip")
        np.savez(tmp_path / "ref.npz", features=unit_rows(0, 5))
        return {"clip_model": str(tmp_path / "clip"), "reference": str(tmp_path / "ref.npz")}
