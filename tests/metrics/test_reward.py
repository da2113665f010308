"""Reward models: PickScore on a tiny random CLIP of its architecture saved offline, the
formula by hand, batch invariance, missing weights; image_reward / hps notes."""

import functools

import numpy as np
import pytest
import torch

from harness.metric import METRICS, Observation
from metrics import reward as rw
from metrics.clip_score import _as_tensor
from tests.metrics.contract import MetricContract, cell_context

PROMPTS = ["a red circle", "a green square on a blue background", "a star", "two cats"]


def tiny_clip_config(vocab_size, hidden_act="gelu", image_size=32):
    """PickScore's architecture (CLIP-H: gelu, not quick_gelu) at toy width and depth."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act,
                         max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32,
                           intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           hidden_act=hidden_act),
        projection_dim=16, logit_scale_init_value=2.3)


def save_tiny_clip(model_dir, processor_dir=None, seed=0, image_size=32):
    """A tiny random CLIPModel and a CLIPProcessor (character tokenizer, PIL image processor)
    saved with save_pretrained: model in `model_dir`, processor in `processor_dir` (default:
    the same folder). Returns (model, processor)."""
    from transformers import CLIPModel, CLIPProcessor

    from harness.models.build import local_clip_tokenizer

    tok = local_clip_tokenizer()
    images = rw.image_processor_class()(size={"shortest_edge": image_size},
                                        crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=images, tokenizer=tok)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(len(tok), image_size=image_size)).eval()
    with torch.no_grad():  # a logit scale unlike the default, so the formula's exp() shows
        model.logit_scale.fill_(2.3)
    model.save_pretrained(model_dir)
    processor.save_pretrained(processor_dir or model_dir)
    return model, processor


def images(n, seed=0, h=40, w=48):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@functools.cache
def saved(root):
    """A tiny PickScore (model and processor folders) under `root`, loaded by the metric's
    own loader (offline)."""
    from pathlib import Path

    root = Path(root)
    save_tiny_clip(root / "model", root / "processor")
    return rw.load_pickscore(str(root / "model"), str(root / "processor"))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return saved(str(tmp_path_factory.mktemp("pickscore")))


def by_hand(model_dir, processor_dir, imgs, prompts):
    """The PickScore README's computation, written out with transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(processor_dir)
    with torch.no_grad():
        px = processor(images=list(imgs), return_tensors="pt")["pixel_values"]
        tok = processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                        return_tensors="pt")
        i = _as_tensor(model.get_image_features(pixel_values=px))
        t = _as_tensor(model.get_text_features(input_ids=tok["input_ids"],
                                               attention_mask=tok["attention_mask"]))
        i = i / torch.norm(i, dim=-1, keepdim=True)
        t = t / torch.norm(t, dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (t @ i.T)).diagonal().numpy()


def test_pickscore_equals_the_readme_formula(tmp_path):
    save_tiny_clip(tmp_path / "m", tmp_path / "p", seed=3)
    scorer = rw.load_pickscore(str(tmp_path / "m"), str(tmp_path / "p"))
    x = images(4)
    ours = np.asarray(scorer(x, PROMPTS))
    assert ours.shape == (4,)
    np.testing.assert_allclose(ours, by_hand(tmp_path / "m", tmp_path / "p", x, PROMPTS),
                               rtol=1e-5, atol=1e-5)
    assert abs(scorer.logit_scale - 2.3) < 1e-6
    assert scorer.name.startswith(str(tmp_path / "m") + "@")  # weights hash in the name


def test_pure_formula():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    got = rw.pickscore_of(a, b, np.log(50.0))
    torch.testing.assert_close(got, torch.tensor([50.0, 50 / np.sqrt(2)], dtype=torch.float64))


def test_scores_are_deterministic_and_batch_invariant(scorer):
    x = images(4, seed=1)
    whole = np.asarray(scorer(x, PROMPTS))
    assert np.array_equal(whole, np.asarray(scorer(x, PROMPTS)))
    old = scorer.backend.batch_size
    try:
        scorer.backend.batch_size = 1
        ones = np.asarray(scorer(x, PROMPTS))
    finally:
        scorer.backend.batch_size = old
    singles = np.concatenate([scorer(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(ones, whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(singles, whole, rtol=0, atol=1e-5)


def test_metric_columns(scorer):
    metric = rw.PickScore(scorer)
    x = images(4, seed=2)
    metric.update(Observation(n_images=4, images=torch.from_numpy(x), prompts=PROMPTS))
    metric.update(Observation(n_images=1, seconds=0.1))  # no images: ignored
    out = metric.compute()
    assert len(metric.scores) == 4
    assert out["pickscore"] == pytest.approx(float(np.mean(scorer(x, PROMPTS))), rel=1e-12)
    assert out["pickscore_ci_lo"] <= out["pickscore"] <= out["pickscore_ci_hi"]
    assert out["pickscore_warning"] == "n=4 < 100: wide interval"
    assert out["pickscore_model"] == scorer.name and out["pickscore_note"] == ""
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metric.update(Observation(n_images=2, images=torch.from_numpy(x[:2]),
                                  prompts=PROMPTS[:1]))


def test_for_cell_loads_the_options_offline(tmp_path):
    save_tiny_clip(tmp_path / "m", tmp_path / "p")
    ctx = cell_context({"pickscore": {"model": str(tmp_path / "m"),
                                      "processor": str(tmp_path / "p")}})
    metric = rw.PickScore.for_cell(ctx)
    assert metric.scorer is not None and metric.note == ""
    metric.update(Observation(n_images=2, images=images(2), prompts=PROMPTS[:2]))
    assert metric.compute()["pickscore"] is not None


@pytest.mark.parametrize("which", ["model", "processor"])
def test_missing_model_path_is_one_line_note(tmp_path, which):
    save_tiny_clip(tmp_path / "m", tmp_path / "p")
    opts = {"model": str(tmp_path / "m"), "processor": str(tmp_path / "p"),
            which: str(tmp_path / "nope")}
    metric = rw.PickScore.for_cell(cell_context({"pickscore": opts}))
    metric.update(Observation(n_images=2, images=images(2), prompts=PROMPTS[:2]))
    out = metric.compute()
    assert out["pickscore"] is None and metric.scores == []
    note = out["pickscore_note"]
    assert "\n" not in note
    assert note.startswith(f"pickscore not measured: [metric_options.pickscore] {which} = ")
    assert f"looked in {tmp_path / 'nope'};" in note and "HF cache" not in note


def test_hub_id_not_in_the_cache_is_one_line_note(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    metric = rw.PickScore.for_cell(cell_context({"pickscore": {"model": "nobody/no-model"}}))
    note = metric.compute()["pickscore_note"]
    assert "\n" not in note and metric.compute()["pickscore"] is None
    assert "[metric_options.pickscore] model = 'nobody/no-model' not found" in note
    assert f"the HF cache {tmp_path / 'hub' / 'models--nobody--no-model'}" in note
    assert "hf download nobody/no-model" in note


def test_defaults_are_the_papers_models():
    assert rw.PICKSCORE_MODEL == "yuvalkirstain/PickScore_v1"
    assert rw.PICKSCORE_PROCESSOR == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_skipped_on_toy_models():
    ctx = cell_context({})
    ctx.spec.has_quality = False
    for name in ("pickscore", "image_reward", "hps"):
        assert METRICS.get(name).for_cell(ctx).compute() == {}


@pytest.mark.parametrize("cls", [rw.ImageRewardMetric, rw.HPSMetric])
def test_package_metrics_leave_a_one_line_note_not_a_score(monkeypatch, tmp_path, cls):
    """Neither package imports here (torchvision); the note says why and where the weights
    were looked for, and the column stays None."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    metric = cls.for_cell(cell_context({}))
    metric.update(Observation(n_images=2, images=images(2), prompts=PROMPTS[:2]))
    out = metric.compute()
    note, col = out[f"{cls.column}_note"], cls.column
    assert out[col] is None and metric.scores == [] and "\n" not in note
    assert note.startswith(f"{col} not measured: the package '{cls.package}'")
    why = rw.import_failure(cls.module)
    if why:
        assert f"(import {cls.module}) does not import here ({why}; " in note
    else:  # pragma: no cover  (a machine where the package imports)
        assert "imports, but diffbench does not score through it" in note
    repo = cls.default_model.replace("/", "--")
    assert (f"[metric_options.{col}] model = '{cls.default_model}': {cls.weights_file} not "
            f"found (looked in ") in note
    assert str(tmp_path / "hub" / f"models--{repo}") in note


def test_package_metric_finds_a_local_checkpoint(tmp_path):
    ckpt = tmp_path / rw.ImageRewardMetric.weights_file
    ckpt.write_bytes(b"not loaded: the package does not import")
    for model in (str(ckpt), str(tmp_path)):
        metric = rw.ImageRewardMetric.for_cell(cell_context({"image_reward": {"model": model}}))
        assert f"weights at {ckpt}" in metric.note


def test_import_failure_is_one_line():
    assert rw.import_failure("numpy") == ""
    assert rw.import_failure("no_such_module_xyz") == ("ModuleNotFoundError: No module named "
                                                       "'no_such_module_xyz'")


# --- contracts ---------------------------------------------------------------------------------
class TestPickScoreContract(MetricContract):
    metric_name = "pickscore"
    root = None

    @pytest.fixture(autouse=True)
    def _root(self, tmp_path_factory):
        if TestPickScoreContract.root is None:
            TestPickScoreContract.root = str(tmp_path_factory.mktemp("pick-contract"))

    def make_metric(self):
        return rw.PickScore(saved(self.root))

    def observations(self):
        x = torch.from_numpy(images(4, seed=5))
        return [Observation(n_images=2, images=x[:2], prompts=PROMPTS[:2]),
                Observation(n_images=1, seconds=0.5),
                Observation(n_images=2, images=x[2:], prompts=PROMPTS[2:])]

    def option_values(self, tmp_path):
        save_tiny_clip(tmp_path / "m", tmp_path / "p")
        return {"model": str(tmp_path / "m"), "processor": str(tmp_path / "p")}


def first_pixel(imgs, prompts):
    """A stand-in scorer for the state machinery only (integer values: exact merges)."""
    return [float(v) for v in np.asarray(imgs)[:, 0, 0, 0]]


class TestImageRewardContract(MetricContract):
    """The package does not import here: states are checked with an injected scorer."""

    metric_name = "image_reward"

    def make_metric(self):
        return METRICS.get(self.metric_name)(first_pixel, model_name="stand-in")

    def observations(self):
        x = torch.from_numpy(images(4, seed=6))
        return [Observation(n_images=2, images=x[:2], prompts=PROMPTS[:2]),
                Observation(n_images=2, images=x[2:], prompts=PROMPTS[2:])]

    def option_values(self, tmp_path):
        return {"model": str(tmp_path / "weights.pt")}


class TestHPSContract(TestImageRewardContract):
    metric_name = "hps"
