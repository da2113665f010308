"""NSFW ratio: NudeNet's bundled detector offline, pure flag / count logic, pinned settings."""

import json

import numpy as np
import pytest
import torch

from harness.metric import Observation
from metrics import nsfw
from tests.metrics.contract import MetricContract


@pytest.fixture
def nudenet():
    """NudeNet itself, for the tests that run its detector (the others inject a fake one)."""
    return pytest.importorskip("nudenet", reason="nudenet not installed (pip install "
                                                 "'diffbench[nsfw]')")


def test_flags_and_counts_are_pure():
    dets = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": []}],
            [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.59, "box": []},
             {"class": "FEET_EXPOSED", "score": 0.9, "box": []}],
            [{"class": "FACE_FEMALE", "score": 0.99, "box": []}], []]
    np.testing.assert_array_equal(nsfw.nsfw_flags(dets), [1, 0, 0, 0])
    counts = nsfw.class_counts(dets)
    assert counts["FEMALE_BREAST_EXPOSED"] == 1 and counts["FEET_EXPOSED"] == 1
    assert sum(counts.values()) == 2
    np.testing.assert_array_equal(nsfw.nsfw_flags(dets, threshold=0.5), [1, 1, 0, 0])


def test_runs_offline_on_synthetic_images(monkeypatch, nudenet):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 64, 64, 3), generator=g, dtype=torch.uint8)
    m = nsfw.NSFWRatio()
    m.update(Observation(n_images=3, images=imgs))
    out = m.compute()
    assert out["nsfw_ratio"] == 0.0  # noise images: nothing detected
    assert out["nsfw_ratio_ci_lo"] == 0.0 and out["nsfw_ratio_ci_hi"] == 0.0
    assert out["nsfw_threshold"] == 0.6
    assert out["nsfw_detector"].startswith("nudenet-3.") and "320n.onnx@" in out["nsfw_detector"]
    assert out["nsfw_classes"].split("|") == sorted(nsfw.NSFW_CLASSES)
    assert json.loads(out["nsfw_counts"]) == dict.fromkeys(nsfw.EXPOSED_CLASSES, 0)
    assert "n=3 < 100" in out["nsfw_ratio_warning"]


class FakeDetector:
    def __init__(self, plan):
        self.plan, self.seen = list(plan), []

    def detect(self, img):
        self.seen.append(img)
        return self.plan.pop(0)


def test_merge_and_channel_order():
    hit = [{"class": "BUTTOCKS_EXPOSED", "score": 0.8, "box": []}]
    det = FakeDetector([hit, [], hit])
    a = nsfw.NSFWRatio(detector=det, detector_name="fake")
    b = nsfw.NSFWRatio(detector=det, detector_name="fake")
    img = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    img[..., 0] = 255  # red in RGB
    a.update(Observation(n_images=1, images=img))
    b.update(Observation(n_images=2, images=img.repeat(2, 1, 1, 1)))
    assert det.seen[0][0, 0].tolist() == [0, 0, 255]  # handed over as BGR
    a.merge(b)
    out = a.compute()
    assert out["nsfw_ratio"] == pytest.approx(2 / 3)
    assert json.loads(out["nsfw_counts"])["BUTTOCKS_EXPOSED"] == 2


def test_missing_nudenet_names_the_extra(monkeypatch):
    import sys

    from harness.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "nudenet", None)
    monkeypatch.setattr(nsfw, "_DETECTORS", {})
    with pytest.raises(MissingExtraError, match=r"diffbench\[nsfw\]"):
        nsfw.load_detector()


class PixelDetector:
    """Deterministic stand-in for NudeDetector: scores read from the (BGR) image's pixels."""

    def detect(self, img):
        return [{"class": "BUTTOCKS_EXPOSED", "score": float(img[0, 0, 2]) / 255, "box": []},
                {"class": "FEET_EXPOSED", "score": float(img[1, 1, 0]) / 255, "box": []}]


class TestNSFWRatioContract(MetricContract):
    metric_name = "nsfw"

    def make_metric(self):
        return nsfw.NSFWRatio(detector=PixelDetector(), detector_name="pixels")

    def observations(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randint(0, 256, (6, 8, 8, 3), generator=g, dtype=torch.uint8)
        return [Observation(n_images=2, images=x[:2]), Observation(n_images=1, flops=3),
                Observation(n_images=4, images=x[2:])]

    def option_values(self, tmp_path):
        return {"threshold": 0.5, "classes": ["FEET_EXPOSED"]}

    def patch_offline(self, monkeypatch, tmp_path):
        monkeypatch.setattr(nsfw, "load_detector", lambda: (PixelDetector(), "pixels"))
