"""Concept ratio: zero-shot detection math, where the concept comes from, the metric."""

import numpy as np
import torch

from harness.metric import Observation
from metrics import concept as cc
from tests.metrics.contract import MetricContract
from tests.metrics.test_clip_score import images, patch_hf_clip, shared_backend, tiny_backend


def test_zero_shot_detection_math():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.9]])
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # concept, contrast
    probs = cc.zero_shot_probs(img, prompts)
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0)
    np.testing.assert_array_equal(cc.detected(probs), [1, 0, 1])
    np.testing.assert_array_equal(cc.detected(probs, min_prob=0.9999), [1, 0, 0])


def test_concept_comes_from_options_or_params():
    from types import SimpleNamespace as NS

    assert cc.concept_of(NS(cell=NS(params='{"concept": "nudity"}'))) == "nudity"
    assert cc.concept_of(NS(cell=NS(params='{"erase": "van gogh"}'))) == "van gogh"
    assert cc.concept_of(NS(cell=NS(params="{}"))) == ""
    ctx = NS(cell=NS(params="{}"), options={"concept": {"concept": "red"}})
    assert cc.concept_of(ctx) == "red"
    toy = NS(cell=NS(params='{"concept": "x"}', weights="none", device="cpu"),
             spec=NS(name="tiny-sd", has_quality=False))
    assert cc.ConceptRatio.for_cell(toy).compute() == {}


def test_metric_counts_and_names():
    backend = tiny_backend()
    m = cc.ConceptRatio(backend, "a red circle", contrasts=("a blue square", "a green star"))
    x = images(5)
    m.update(Observation(n_images=5, images=x))
    out = m.compute()
    probs = cc.zero_shot_probs(backend.image_embeds(x.numpy()), backend.text_embeds(m.prompts),
                               float(backend.model.logit_scale.detach().exp()))
    assert out["concept_ratio"] == float(cc.detected(probs).mean())
    assert out["concept"] == "a red circle" and out["concept_model"] == "tiny-clip"
    assert out["concept_contrasts"] == "a blue square|a green star"
    assert out["concept_ratio_ci_lo"] <= out["concept_ratio"] <= out["concept_ratio_ci_hi"]
    assert cc.ConceptRatio().compute() == {}


def test_world_colour_concept_on_mini_sd_uses_the_world_detector():
    """On mini-sd, "red" is judged by mini-CLIP over all world captions: real red shapes are
    detected, shapes of other colours are not."""
    import types

    from harness.mini import world

    batch = world.sample(200, seed=7, split="all")
    red = batch.colour == world.COLOURS.index("red")
    context = types.SimpleNamespace(cell=types.SimpleNamespace(model="mini-sd"),
                                    spec=types.SimpleNamespace(embedded=True))
    assert cc.WorldAttributeDetector.handles(context, "red")
    assert not cc.WorldAttributeDetector.handles(context, "a red thing")
    m = cc.ConceptRatio(concept="red")
    m.world = cc.WorldAttributeDetector("red")
    m.update(Observation(n_images=int(red.sum()), images=batch.images[red]))
    hits = m.compute()
    m.reset()
    m.update(Observation(n_images=int((~red).sum()), images=batch.images[~red]))
    misses = m.compute()
    assert hits["concept_ratio"] >= 0.95 and misses["concept_ratio"] <= 0.05
    assert hits["concept_model"] == "mini-clip-world-zero-shot"


def test_several_world_concepts_get_a_column_each_and_any_of_them_counts():
    """concept = "red,circle": each concept's share on its own, and the share showing either."""
    import types

    from harness.mini import world

    batch = world.sample(120, seed=11, split="all")
    context = types.SimpleNamespace(cell=types.SimpleNamespace(model="mini-sd", params="{}"),
                                    spec=types.SimpleNamespace(embedded=True),
                                    options={"concept": {"concept": "red,circle"}})
    context.store = None
    m = cc.ConceptRatio.for_cell(context)
    m.update(Observation(n_images=60, images=batch.images[:60]))
    m.update(Observation(n_images=60, images=batch.images[60:]))
    out = m.compute()
    red = (batch.colour == world.COLOURS.index("red")).double()
    circle = (batch.shape == world.SHAPES.index("circle")).double()
    assert abs(out["concept_ratio_red"] - float(red.mean())) <= 0.03
    assert abs(out["concept_ratio_circle"] - float(circle.mean())) <= 0.05
    assert abs(out["concept_ratio"] - float(torch.maximum(red, circle).mean())) <= 0.05
    assert out["concept"] == "red,circle" and "concept_ratio_red_ci_lo" in out


def test_concept_detector_gives_probabilities_that_agree_with_the_flags():
    import types

    from harness.mini import world

    batch = world.sample(60, seed=3, split="all")
    context = types.SimpleNamespace(cell=types.SimpleNamespace(model="mini-sd", params="{}"),
                                    spec=types.SimpleNamespace(embedded=True),
                                    options={"concept": {"concept": "red"}}, store=None)
    probs = cc.concept_detector(context, "red")(batch.images)
    flags = torch.tensor(cc.WorldAttributeDetector("red").flags(batch.images.numpy()))
    assert probs.shape == (60,) and ((probs >= 0) & (probs <= 1)).all()
    assert ((probs > 0.5).double() == flags).double().mean() >= 0.95


class TestConceptRatioContract(MetricContract):
    metric_name = "concept"

    def make_metric(self):
        return cc.ConceptRatio(shared_backend(), "a red circle",
                               contrasts=("a blue square", "a green star"))

    def observations(self):
        return [Observation(n_images=3, images=images(3, seed=1)),
                Observation(n_images=1, flops=10),
                Observation(n_images=3, images=images(3, seed=2))]

    def option_values(self, tmp_path):
        return {"concept": "a red circle", "clip_model": "tiny-clip"}

    def patch_offline(self, monkeypatch, tmp_path):
        patch_hf_clip(monkeypatch)
