"""Frechet distance: reference match (scipy, clean-fid's formula), exact shard merge, cache."""

import numpy as np
import pytest
import torch
from scipy import linalg

from harness.metric import Observation
from metrics import frechet as fr
from tests.metrics.contract import MetricContract


def reference_fd(mu1, s1, mu2, s2):
    """pytorch-fid / clean-fid's formula, written out with scipy."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def gaussian_stats(seed, n=200, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    f = rng.normal(shift, 1.0, (n, d)) @ rng.normal(0, 0.5, (d, d))
    return f, f.mean(0), np.cov(f, rowvar=False)


@pytest.mark.parametrize("d", [4, 16, 64])
def test_matches_scipy_reference(d):
    f1, mu1, s1 = gaussian_stats(0, d=d)
    f2, mu2, s2 = gaussian_stats(1, d=d, shift=0.3)
    ref = reference_fd(mu1, s1, mu2, s2)
    assert fr.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    eig = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) \
        - 2 * fr.trace_sqrt_product(s1, s2)
    assert eig == pytest.approx(ref, rel=1e-6)
    assert fr.Reference(mu2, s2).distance(f1) == pytest.approx(ref, rel=1e-6)
    assert fr.Reference(mu2, s2).distance_stats(mu1, s1) == pytest.approx(ref, rel=1e-6)


def test_rank_deficient_features_n_below_d():
    """n < d (a small cell with 2048-d features): the fast Gram path equals the scipy path."""
    rng = np.random.default_rng(3)
    f = rng.normal(size=(10, 40))
    g = rng.normal(size=(300, 40))
    mu1, s1 = fr.mean_cov(f)
    mu2, s2 = fr.mean_cov(g)
    ref = reference_fd(mu1, s1, mu2, s2)
    assert fr.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert fr.Reference(mu2, s2).distance(f) == pytest.approx(ref, rel=1e-6)


def test_identical_distributions_give_zero():
    _, mu, s = gaussian_stats(0)
    assert abs(fr.frechet_distance(mu, s, mu, s)) < 1e-8


def test_running_moments_merge_equals_one_pass():
    f, mu, s = gaussian_stats(5, n=101)
    a, b, whole = fr.RunningMoments(), fr.RunningMoments(), fr.RunningMoments()
    a.update(f[:40])
    b.update(f[40:])
    whole.update(f)
    a.merge(b)
    assert a.n == 101
    m1, c1 = a.mean_cov()
    np.testing.assert_allclose(m1, mu, rtol=1e-12)
    np.testing.assert_allclose(c1, s, rtol=1e-9, atol=1e-12)


def fake_extractor(images):
    x = torch.from_numpy(np.asarray(images)).double()
    return torch.stack([x.mean((1, 2, 3)), x[..., 0].mean((1, 2)), x[..., 1].std((1, 2)),
                        x[:, :4].mean((1, 2, 3))], 1).numpy()


def random_images(seed, n=12, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def test_metric_shards_merge_exactly():
    ref_feats = fake_extractor(random_images(99, n=50))
    ref = fr.Reference(*fr.mean_cov(ref_feats), name="fake")
    imgs = random_images(1)

    def metric():
        return fr.FrechetMetric(fake_extractor, ref, extractor_name="fake", n_boot=50)

    one = metric()
    one.update(Observation(n_images=12, images=imgs))
    a, b = metric(), metric()
    a.update(Observation(n_images=5, images=imgs[:5]))
    b.update(Observation(n_images=7, images=imgs[5:]))
    a.merge(b)
    r1, r2 = one.compute(), a.compute()
    assert r1["fd"] == pytest.approx(r2["fd"], rel=1e-12)
    mu, sigma = fr.mean_cov(fake_extractor(imgs))
    assert r1["fd"] == pytest.approx(reference_fd(mu, sigma, ref.mu, ref.sigma), rel=1e-6)
    assert (r1["fd_ci_lo"], r1["fd_ci_hi"]) == pytest.approx((r2["fd_ci_lo"], r2["fd_ci_hi"]))
    assert r1["fd_ci_lo"] <= r1["fd"] <= r1["fd_ci_hi"]
    assert "n=12 < 5000" in r1["fd_warning"]
    assert r1["fd_extractor"] == "fake" and r1["fd_reference"] == "fake"
    a.reset()
    assert a.moments.n == 0 and a.features == []


def test_stats_cache_keyed_and_user_stats(tmp_path):
    calls = []

    def feats():
        calls.append(1)
        return fake_extractor(random_images(7, n=20))

    r1 = fr.cached_reference("world", "fake", "none", 20, feats, tmp_path)
    r2 = fr.cached_reference("world", "fake", "none", 20, feats, tmp_path)
    fr.cached_reference("world", "fake", "clean", 20, feats, tmp_path)
    assert len(calls) == 2  # the second call came from the cache; another resize is a new key
    np.testing.assert_array_equal(r1.sigma, r2.sigma)
    np.testing.assert_allclose(r2.root @ r2.root, r2.sigma, atol=1e-9)  # cached with its root
    assert len(list(tmp_path.glob("*.npz"))) == 2
    # a user-given file (MLPerf val2014.npz style: mu, sigma)
    path = tmp_path / "val2014.npz"
    np.savez(path, mu=r1.mu, sigma=r1.sigma)
    user = fr.load_stats(path)
    np.testing.assert_array_equal(user.mu, r1.mu)
    from harness.errors import DiffbenchError

    np.savez(tmp_path / "bad.npz", m=r1.mu)
    with pytest.raises(DiffbenchError, match="mu / sigma"):
        fr.load_stats(tmp_path / "bad.npz")


def test_fid_without_weights_names_where_it_looked(monkeypatch, tmp_path):
    from types import SimpleNamespace

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIFFBENCH_INCEPTION", str(tmp_path / "nope.pth"))
    ctx = SimpleNamespace(cell=SimpleNamespace(weights="some/model", device="cpu", params="{}"),
                          spec=SimpleNamespace(name="sd15", has_quality=True), store=None)
    m = fr.FID.for_cell(ctx)
    m.update(Observation(n_images=2, images=random_images(0, n=2)))
    out = m.compute()
    assert out["fid"] is None
    assert "nope.pth" in out["fid_note"] and "DIFFBENCH_INCEPTION" in out["fid_note"]


def test_quality_skipped_for_toy_and_random_weights():
    from types import SimpleNamespace

    toy = SimpleNamespace(cell=SimpleNamespace(weights="none", device="cpu", params="{}"),
                          spec=SimpleNamespace(name="tiny-sd", has_quality=False), store=None)
    for cls in (fr.FID, fr.FDClip):
        m = cls.for_cell(toy)
        m.update(Observation(n_images=2, images=random_images(0, n=2)))
        assert m.compute() == {}


def test_fd_clip_on_world_reference(tmp_path):
    from harness.mini import world
    from tests.metrics.test_clip_score import tiny_backend

    backend = tiny_backend()
    m = fr.FDClip.with_backend(backend, directory=tmp_path, n=64)
    assert m.reference is not None and m.reference.mu.shape == (16,)
    real = world.sample(16, seed=5, split="all").images
    m.update(Observation(n_images=16, images=real))
    out = m.compute()
    assert out["fd_clip_extractor"] == "tiny-clip" and out["fd_clip_resize"] == "none"
    assert out["fd_clip"] >= 0 and out["fd_clip_ci_lo"] <= out["fd_clip_ci_hi"]
    noise = random_images(0, n=16, size=32)
    m2 = fr.FDClip.with_backend(backend, directory=tmp_path, n=64)  # from the cache
    m2.update(Observation(n_images=16, images=noise))
    assert m2.compute()["fd_clip"] > out["fd_clip"]  # noise is farther from the world


def test_fd_clip_missing_mini_clip_leaves_note(monkeypatch):
    from types import SimpleNamespace as NS

    from harness.errors import DiffbenchError
    from metrics import clip_score

    def missing(context, metric):
        raise DiffbenchError("mini-CLIP weights not found in x")

    monkeypatch.setattr(clip_score, "load_backend", missing)
    ctx = NS(cell=NS(weights="w", device="cpu", params="{}"),
             spec=NS(name="mini-sd", has_quality=True, embedded=True), store=None)
    m = fr.FDClip.for_cell(ctx)
    m.update(Observation(n_images=2, images=random_images(0, n=2)))
    out = m.compute()
    assert out["fd_clip"] is None and "mini-CLIP weights not found" in out["fd_clip_note"]
    c = clip_score.CLIPScore.for_cell(ctx).compute()
    assert c == {"clip_score": None, "clip_score_note": "mini-CLIP weights not found in x"}


def integer_features(images):
    """Integer-valued float64 features: running sums and covariances of them are exact."""
    x = torch.from_numpy(np.asarray(images)).long()
    return torch.stack([x[:, 0, 0, 0], x[:, 1, 1, 1], x[:, 2, 0, 2],
                        x[:, 0, 3].sum(-1) % 17], 1).double().numpy()


def integer_reference():
    return fr.Reference(*fr.mean_cov(integer_features(random_images(99, n=50))), name="ints")


def frechet_observations():
    return [Observation(n_images=4, images=random_images(s, n=4)) for s in (1, 2, 3)]


class TestFIDContract(MetricContract):
    """FID with an injected extractor (the Inception weight file is not here)."""

    metric_name = "fid"

    def make_metric(self):
        return fr.FID(integer_features, integer_reference(), extractor_name="ints",
                      resize="clean", n_boot=20)

    def observations(self):
        return frechet_observations()

    def option_values(self, tmp_path):
        weights = tmp_path / "inception.pth"
        weights.write_bytes(b"stand-in: load_inception is patched")
        ref = integer_reference()
        path = fr.save_stats(tmp_path / "ref.npz", ref.mu, ref.sigma)
        return {"weights": str(weights), "reference": str(path), "resize": "clean"}

    def patch_offline(self, monkeypatch, tmp_path):
        from metrics import inception

        monkeypatch.setattr(inception, "load_inception",
                            lambda path=None: (torch.nn.Identity(), "0" * 64))


class TestFDClipContract(MetricContract):
    metric_name = "fd_clip"
    embedded = True

    def make_metric(self):
        return fr.FDClip(integer_features, integer_reference(), extractor_name="ints",
                         resize="none", n_boot=20)

    def observations(self):
        return frechet_observations()

    def option_values(self, tmp_path):
        return {"clip_model": "tiny-clip"}

    def patch_offline(self, monkeypatch, tmp_path):
        from harness.cache import CACHE_ENV
        from tests.metrics.test_clip_score import patch_hf_clip

        patch_hf_clip(monkeypatch)
        monkeypatch.setenv(CACHE_ENV, str(tmp_path))
        monkeypatch.setattr(fr, "world_reference_images",
                            lambda n=fr.WORLD_REFERENCE_N, **kw: random_images(0, 8, 32).numpy())


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", b"garbage"])
def test_damaged_cached_stats_are_rebuilt(tmp_path, capsys, damage):
    calls = []

    def feats():
        calls.append(1)
        return fake_extractor(random_images(7, n=20))

    first = fr.cached_reference("world", "fake", "none", 20, feats, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(damage)
    again = fr.cached_reference("world", "fake", "none", 20, feats, tmp_path)
    assert len(calls) == 2 and "rebuilding damaged cached statistics" in capsys.readouterr().err
    np.testing.assert_array_equal(first.sigma, again.sigma)
    np.testing.assert_array_equal(fr.load_stats(path).mu, first.mu)  # the file is whole again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
