import numpy as np
import pytest
import torch

from harness.metric import Observation
from metrics import cmmd as cm
from metrics import frechet as fr
from metrics import kid as kd
from tests.metrics.contract import MetricContract
from tests.metrics.test_frechet import integer_features, random_images


def _features(seed, n, d=16, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift)


@pytest.mark.parametrize("n_real,n_fake,subset_size,subsets", [(60, 60, 60, 1), (80, 50, 20, 7)])
def test_kid_equals_torchmetrics(n_real, n_fake, subset_size, subsets):
    """torchmetrics' KernelInceptionDistance on the same features (an identity extractor),
    its subsets drawn from the global generator seeded as ours: equal to 1e-6 relative."""
    tm = pytest.importorskip("torchmetrics.image.kid", reason="torchmetrics not installed "
                             "(pip install --no-deps torchmetrics lightning-utilities)")
    real, fake = _features(0, n_real), _features(1, n_fake, shift=0.3)
    metric = tm.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets,
                                        subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(5)
    expected_mean, expected_std = (float(v) for v in metric.compute())
    mean, std = kd.kid(real, fake, subsets=subsets, subset_size=subset_size, seed=5)
    assert mean == pytest.approx(expected_mean, rel=1e-6)
    assert std == pytest.approx(expected_std, rel=1e-6, abs=1e-12)


def test_mmd2_unbiased_by_hand():
    """Two 2-row samples: the within-sample terms average the off-diagonal pairs only."""
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]])
    k = lambda a, b: a @ b.T  # noqa: E731  (linear kernel: MMD^2 = |mean x - mean y|^2 - ...)
    # within x: k(0,1) = 0; within y: k(1,2) = 2; cross: (0 + 0 + 1 + 2) / 4
    assert float(kd.mmd2_unbiased(k(x, x), k(x, y), k(y, y))) == pytest.approx(0 + 2 - 1.5)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    same = kd.kid(_features(0, 400), _features(1, 400), subsets=20, subset_size=200)[0]
    shifted = kd.kid(_features(0, 400), _features(1, 400, shift=0.5), subsets=20,
                     subset_size=200)[0]
    assert abs(same) < 0.01 < shifted


def test_cmmd_equals_the_papers_formula_written_out():
    """CMMD = 1000 (E k(x,x') + E k(y,y') - 2 E k(x,y)), k = exp(-|a-b|^2 / 200), all pairs."""
    x, y = _features(0, 9, d=5).numpy(), _features(1, 7, d=5, shift=2.0).numpy()

    def mean_k(a, b):
        return np.mean([[np.exp(-np.sum((p - q) ** 2) / (2 * 10.0 ** 2)) for q in b] for p in a])

    expected = 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))
    assert cm.rbf_mmd(x, y) == pytest.approx(expected, rel=1e-9)
    assert cm.rbf_mmd(x, x) == pytest.approx(0.0, abs=1e-9)


def test_cached_features_are_computed_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6.0).reshape(3, 2)

    first = kd.cached_features("d", "e", 3, compute, tmp_path)
    again = kd.cached_features("d", "e", 3, compute, tmp_path)
    assert len(calls) == 1 and np.array_equal(first, again)


def _real():
    return integer_features(random_images(99, n=50))


def _observations():
    return [Observation(n_images=4, images=random_images(s, n=4)) for s in (1, 2, 3)]


def _patch_world(monkeypatch, tmp_path):
    from harness.cache import CACHE_ENV
    from tests.metrics.test_clip_score import patch_hf_clip

    patch_hf_clip(monkeypatch)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(kd, "world_images", lambda n=fr.WORLD_REFERENCE_N, **kw:
                        random_images(0, 8, 32).numpy())


class TestKDClipContract(MetricContract):
    metric_name = "kd_clip"
    embedded = True

    def make_metric(self):
        return kd.KDClip(integer_features, _real(), "ints", "ints", n_boot=10)

    def observations(self):
        return _observations()

    def option_values(self, tmp_path):
        return {"clip_model": "tiny-clip"}

    def patch_offline(self, monkeypatch, tmp_path):
        _patch_world(monkeypatch, tmp_path)


class TestCMMDClipContract(TestKDClipContract):
    metric_name = "cmmd_clip"

    def make_metric(self):
        return cm.CMMDClip(integer_features, _real(), "ints", "ints", n_boot=10)


class TestKIDContract(MetricContract):
    """KID with an injected extractor (the Inception weight file is not here)."""

    metric_name = "kid"

    def make_metric(self):
        return kd.KID(integer_features, _real(), "ints", "ints", n_boot=10)

    def observations(self):
        return _observations()

    def option_values(self, tmp_path):
        weights = tmp_path / "inception.pth"
        weights.write_bytes(b"stand-in: load_inception is patched")
        path = tmp_path / "ref.npz"
        np.savez(path, features=_real())
        return {"weights": str(weights), "reference": str(path), "resize": "clean"}

    def patch_offline(self, monkeypatch, tmp_path):
        from metrics import inception

        monkeypatch.setattr(inception, "load_inception",
                            lambda path=None: (torch.nn.Identity(), "0" * 64))


def test_compute_columns_and_small_sample_warning():
    metric = kd.KDClip(integer_features, _real(), "ints", "world:n50", n_boot=10)
    for obs in _observations():
        metric.update(obs)
    out = metric.compute()
    assert out["kd_clip"] is not None and out["kd_clip_std"] >= 0
    assert out["kd_clip_ci_lo"] <= out["kd_clip_ci_hi"]
    assert out["kd_clip_warning"].startswith("n=12 < 1000")
    assert out["kd_clip_reference"] == "world:n50"


def test_missing_reference_file_is_one_line_error(tmp_path):
    from tests.metrics.contract import one_line_error

    with one_line_error("reference features .*nope.npz: cannot read"):
        kd.load_features(tmp_path / "nope.npz")
