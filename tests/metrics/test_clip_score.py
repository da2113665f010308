"""CLIP score: pure math, the torchmetrics reference on a tiny random CLIP, the metric."""

import functools

import numpy as np
import pytest
import torch

from harness.metric import Observation
from metrics import clip_score as cs
from tests.metrics.contract import MetricContract


def tiny_backend(seed=0, name="tiny-clip"):
    """A tiny random transformers CLIP with a character tokenizer (offline)."""
    from transformers import CLIPConfig, CLIPModel

    from harness.models.build import local_clip_tokenizer

    tok = local_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(seed)
    return cs.ClipBackend(name, CLIPModel(cfg).eval(), tok, cs.tensor_preprocess(32))


def images(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3),
                                                                 dtype=np.uint8))


def test_pure_function_is_100_clamped_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    per = cs.clip_cosines(a, b)
    torch.testing.assert_close(per, torch.tensor([100.0, -100.0, 100 / np.sqrt(2)],
                                                 dtype=torch.float64))
    assert cs.clip_score(a, b) == pytest.approx((100 - 100 + 100 / np.sqrt(2)) / 3)
    assert cs.clip_score(a[1:2], b[1:2]) == 0.0


def test_matches_torchmetrics_functional():
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    backend = tiny_backend(seed=4)  # a seed whose mean cosine is positive (not clamped to 0)
    prompts = ["a red circle", "a blue square on a green background", "a star"]
    imgs = images(3)

    class Wrapped(torch.nn.Module):  # torchmetrics 1.9 expects tensors from get_*_features
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return cs._as_tensor(self.model.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids, attention_mask):
            return cs._as_tensor(self.model.get_text_features(input_ids=input_ids,
                                                              attention_mask=attention_mask))

    def processor(images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            arr = np.stack([i.permute(1, 2, 0).numpy() for i in images])
            return {"pixel_values": backend.pixel_values(arr)}
        return dict(backend.tokenizer(text, padding=True, return_tensors="pt"))

    ref = tm_clip_score(imgs.permute(0, 3, 1, 2), prompts,
                        model_name_or_path=lambda: (Wrapped(backend.model), processor))
    ours = cs.clip_score(backend.image_embeds(imgs.numpy()), backend.text_embeds(prompts))
    assert ours == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-4)
    assert ours > 0  # not a vacuous match of two clamped zeros


def test_metric_columns_merge_and_model_name():
    backend = tiny_backend()
    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "white")]
    imgs = images(4)
    whole = cs.CLIPScore(backend)
    whole.update(Observation(n_images=4, images=imgs, prompts=prompts))
    a, b = cs.CLIPScore(backend), cs.CLIPScore(backend)
    a.update(Observation(n_images=2, images=imgs[:2], prompts=prompts[:2]))
    b.update(Observation(n_images=2, images=imgs[2:], prompts=prompts[2:]))
    a.merge(b)
    r1, r2 = whole.compute(), a.compute()
    assert r1["clip_score"] == pytest.approx(r2["clip_score"], rel=1e-9)
    assert r1["clip_model"] == "tiny-clip"
    assert r1["clip_score_ci_lo"] <= r1["clip_score_ci_hi"]
    assert "n=4 < 100" in r1["clip_score_warning"]
    direct = cs.clip_score(backend.image_embeds(imgs.numpy()), backend.text_embeds(prompts))
    assert r1["clip_score"] == pytest.approx(direct, rel=1e-6)


def test_for_cell_skips_toy_models():
    from types import SimpleNamespace as NS

    ctx = NS(cell=NS(weights="none", device="cpu", params="{}"),
             spec=NS(name="tiny-sd", has_quality=False), store=None)
    assert cs.CLIPScore.for_cell(ctx).compute() == {}


def test_mini_clip_backend_uses_its_pixel_and_token_layout(monkeypatch):
    """mini-CLIP architecture with random weights (the trained file may not exist yet)."""
    from transformers import CLIPModel

    from harness.mini import clip as mini_sd

    tok = mini_sd.build_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(mini_sd.clip_config(len(tok))).eval()
    monkeypatch.setattr(mini_sd, "load_mini_clip", lambda device="cpu": (model, tok))
    backend = cs.mini_clip_backend()
    assert backend.name.startswith("mini-clip")
    x = images(3)
    emb = backend.image_embeds(x.numpy())
    ref = mini_sd.image_embeddings(model, x.permute(0, 3, 1, 2).float() / 255.0)
    torch.testing.assert_close(torch.nn.functional.normalize(emb, dim=-1), ref)
    texts = ["a large red circle on a blue background", "a small star on a black background"]
    torch.testing.assert_close(
        torch.nn.functional.normalize(backend.text_embeds(texts), dim=-1),
        mini_sd.text_embeddings(model, tok, texts))


@functools.cache
def shared_backend():
    """One tiny random CLIP for the contract tests (built once per session)."""
    return tiny_backend()


def patch_hf_clip(monkeypatch):
    """`clip_model` names resolve to the shared tiny CLIP instead of the hub."""
    monkeypatch.setattr(cs, "hf_clip_backend", lambda name=cs.DEFAULT_CLIP, device="cpu":
                        shared_backend())


class TestCLIPScoreContract(MetricContract):
    metric_name = "clip_score"

    def make_metric(self):
        return cs.CLIPScore(shared_backend())

    def observations(self):
        prompts = ["a red circle", "a green square", "a blue star", "a white cross"]
        x = images(4, seed=3)
        return [Observation(n_images=2, images=x[:2], prompts=prompts[:2]),
                Observation(n_images=1, seconds=0.5),
                Observation(n_images=2, images=x[2:], prompts=prompts[2:])]

    def option_values(self, tmp_path):
        return {"clip_model": "tiny-clip"}

    def patch_offline(self, monkeypatch, tmp_path):
        patch_hf_clip(monkeypatch)
