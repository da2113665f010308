"""The embedded transformer mini-sd3: loads offline as StableDiffusion3Pipeline, shares
mini-sd's text tower and VAE, generates through the harness, passes a small quality gate."""

import json

import pytest
import torch

from harness.mini import evaluate as mini_eval
from harness.mini import mmdit, paths
from harness.mini.zeroshot import ZeroShot
from harness.models import EMBEDDED, MODELS, check_weights, load_pipeline, weights_source
from harness.run.generate import call_kwargs, generate
from harness.steps import StepContext

# Floors: the measured adherence (README, mini-sd3 row; training.json) minus a margin.
FLOOR_SEEN = 0.60  # colour and shape both right, 48 seen prompts
FLOOR_HELDOUT = 0.25  # 16 held-out combinations


@pytest.fixture(scope="module")
def spec():
    return MODELS.get("mini-sd3")


@pytest.fixture(scope="module")
def pipe(spec):
    return load_pipeline(spec, weights_source(spec, "default"), torch.float32, "cpu")


def test_registered_with_embedded_default_weights(spec):
    assert spec.pipeline_class == "StableDiffusion3Pipeline" and spec.embedded
    assert weights_source(spec, "default") == EMBEDDED and spec.has_quality
    check_weights(spec, EMBEDDED)  # the shipped folder is whole


def test_pipeline_folder_is_safetensors_without_t5():
    """(Size and pickle-free: every embedded asset together, tests/harness/mini/test_pipeline.py)"""
    names = {f.relative_to(paths.MMDIT_DIR).as_posix() for f in paths.MMDIT_DIR.rglob("*")}
    assert "transformer/diffusion_pytorch_model.safetensors" in names
    index = json.loads((paths.MMDIT_DIR / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == [None, None]  # no T5


def test_text_tower_and_vae_are_mini_sds(pipe):
    tokenizer, text_encoder, vae = mmdit.frozen_parts()
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        ours = encoder.text_model.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in text_encoder.state_dict().items())
        assert torch.equal(encoder.text_projection.weight, torch.eye(ours[
            "embeddings.token_embedding.weight"].shape[1]))
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in vae.state_dict().items())
    assert pipe.vae.config.shift_factor == mmdit.LATENT_SHIFT
    assert pipe.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_random_build_has_the_same_architecture(spec, pipe):
    random = spec.build_random(torch.float32)
    for key, value in mmdit.TRANSFORMER.items():
        assert random.transformer.config[key] == pipe.transformer.config[key] == value, key
    assert {k: v.shape for k, v in random.transformer.state_dict().items()} == \
        {k: v.shape for k, v in pipe.transformer.state_dict().items()}


def test_generates_through_the_harness(spec, pipe):
    kwargs = call_kwargs(spec, ["a large red circle on a blue background"] * 2, [1, 1],
                         spec.steps, spec.guidance, spec.resolution, {})
    images = generate(pipe, StepContext(), kwargs)
    assert images.shape == (2, 32, 32, 3) and torch.equal(images[0], images[1])
    assert images.float().std() > 10


def test_quality_gate_prompt_adherence(spec, pipe):
    zs = ZeroShot.load()
    seen = mini_eval.adherence(pipe, zs, 48, "train", 0, spec.steps, spec.guidance, "mini-sd3")
    held = mini_eval.adherence(pipe, zs, 16, "heldout", 0, spec.steps, spec.guidance, "mini-sd3")
    assert seen["colour_shape"] >= FLOOR_SEEN, {k: v for k, v in seen.items() if k != "images"}
    assert held["colour_shape"] >= FLOOR_HELDOUT, {k: v for k, v in held.items() if k != "images"}
