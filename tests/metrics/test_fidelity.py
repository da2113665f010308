"""Fidelity to the baseline: PSNR / SSIM per image against torchmetrics and closed forms."""

import math

import numpy as np
import pytest
import torch

from harness.metric import Observation
from metrics import fidelity as fd
from tests.metrics.contract import MetricContract


def imgs(n=4, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def test_known_psnr_values():
    a = torch.full((2, 16, 16, 3), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # mse 100 -> 10 log10(255^2 / 100)
    b[1] += 1  # mse 1
    psnr = fd.psnr_per_image(b, a)
    torch.testing.assert_close(psnr, torch.tensor([10 * math.log10(255**2 / 100),
                                                   10 * math.log10(255**2)],
                                                  dtype=torch.float64))


def test_matches_torchmetrics_per_image():
    from torchmetrics.functional import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    x, y = imgs(3, 0), imgs(3, 1)
    psnr, ssim = fd.psnr_per_image(x, y), fd.ssim_per_image(x, y)
    for i in range(3):
        xi = x[i:i + 1].permute(0, 3, 1, 2).double()
        yi = y[i:i + 1].permute(0, 3, 1, 2).double()
        assert float(psnr[i]) == pytest.approx(float(peak_signal_noise_ratio(xi, yi,
                                                                             data_range=255.0)))
        assert float(ssim[i]) == pytest.approx(float(structural_similarity_index_measure(
            xi, yi, data_range=255.0)), rel=1e-6)


def test_identical_images_are_capped_and_counted():
    x = imgs(4)
    m = fd.Fidelity()
    m.update(Observation(n_images=4, images=x, baseline_images=x.clone()))
    out = m.compute()
    assert out["psnr"] == fd.PSNR_CAP and out["psnr_ci_hi"] == fd.PSNR_CAP
    assert out["ssim"] == pytest.approx(1.0)
    assert out["psnr_identical"] == 4
    assert all(np.isfinite(v) for k, v in out.items() if isinstance(v, float))


def test_metric_merge_ci_and_baseline_rows_empty():
    from types import SimpleNamespace as NS

    x, y = imgs(6, 0), imgs(6, 1)
    whole, a, b = fd.Fidelity(), fd.Fidelity(), fd.Fidelity()
    whole.update(Observation(n_images=6, images=x, baseline_images=y))
    a.update(Observation(n_images=2, images=x[:2], baseline_images=y[:2]))
    b.update(Observation(n_images=4, images=x[2:], baseline_images=y[2:]))
    a.merge(b)
    assert whole.compute() == a.compute()
    out = whole.compute()
    assert out["psnr_ci_lo"] <= out["psnr"] <= out["psnr_ci_hi"]
    assert "n=6 < 10" in out["psnr_warning"]
    base = NS(cell=NS(key="k", baseline_key="k", weights="w"), spec=NS(has_quality=True))
    m = fd.Fidelity.for_cell(base)
    m.update(Observation(n_images=6, images=x, baseline_images=y))
    assert m.compute() == {}
    nobase = fd.Fidelity()
    nobase.update(Observation(n_images=6, images=x))
    assert nobase.compute() == {}


class TestFidelityContract(MetricContract):
    metric_name = "fidelity"

    def make_metric(self):
        return fd.Fidelity()

    def observations(self):
        x, y = imgs(4, 0), imgs(4, 1)
        return [Observation(n_images=2, images=x[:2], baseline_images=y[:2]),
                Observation(n_images=2, images=x[2:], baseline_images=x[2:].clone()),
                Observation(n_images=2, images=x[:2]),  # no baseline images: ignored
                Observation(n_images=2, images=y[2:], baseline_images=x[2:])]
