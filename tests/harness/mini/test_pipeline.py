"""The embedded mini-sd model: loads offline from the repo through the registry, generates, and
passes a small quality gate (prompt adherence judged by mini-CLIP, zero-shot accuracy, PSNR)."""

import json

import pytest
import torch

from harness.mini import clip as mini_clip
from harness.mini import evaluate as mini_eval
from harness.mini import paths, world
from harness.mini.zeroshot import ZeroShot
from harness.models import EMBEDDED, MODELS, load_pipeline, weights_source
from harness.run.generate import call_kwargs, generate
from harness.steps import StepContext

# Floors: measured values (see harness/mini/assets/mini-sd/training.json and the report of
# `python -m harness.mini.evaluate`) minus a margin for other seeds and platforms.
FLOOR_SEEN = 0.60  # colour and shape both right, 48 seen prompts
FLOOR_HELDOUT = 0.30  # 16 held-out (purple triangle, yellow cross) prompts
FLOOR_CLIP_COLOUR, FLOOR_CLIP_SHAPE = 0.93, 0.88
FLOOR_PSNR = 26.0
MAX_ASSET_MB = 30


@pytest.fixture(scope="module")
def spec():
    return MODELS.get("mini-sd")


@pytest.fixture(scope="module")
def pipe(spec):
    return load_pipeline(spec, weights_source(spec, "default"), torch.float32, "cpu")


@pytest.fixture(scope="module")
def zeroshot():
    return ZeroShot.load()


def test_registered_with_embedded_default_weights(spec):
    assert spec.pipeline_class == "StableDiffusionPipeline"
    assert (spec.resolution, spec.steps, spec.guidance) == (32, 25, 5.0)
    assert spec.has_quality and spec.hub_id is None
    assert weights_source(spec, "default") == weights_source(spec, None) == EMBEDDED
    assert weights_source(spec, "none") == "none"
    assert weights_source(MODELS.get("tiny-sd"), "default") == "none"


def test_assets_are_safetensors_and_small():
    files = [f for d in (paths.PIPELINE_DIR, paths.CLIP_DIR) for f in d.rglob("*")
             if f.is_file()]
    names = {f.relative_to(paths.ASSETS).as_posix() for f in files}
    for part in ("unet", "vae", "text_encoder"):
        assert f"mini-sd/{part}/diffusion_pytorch_model.safetensors" in names or \
            f"mini-sd/{part}/model.safetensors" in names
    assert "mini-clip/model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert sum(f.stat().st_size for f in files) <= MAX_ASSET_MB * 2**20
    index = json.loads((paths.PIPELINE_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_architecture_is_stable_diffusion_like(pipe):
    unet, sched = pipe.unet.config, pipe.scheduler.config
    assert unet.down_block_types.count("CrossAttnDownBlock2D") >= 2
    assert unet.up_block_types.count("CrossAttnUpBlock2D") >= 2
    assert unet.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == \
        ("scaled_linear", 0.00085, 0.012)
    assert pipe.vae_scale_factor == 4 and unet.sample_size == 8
    assert pipe.tokenizer.model_max_length == mini_clip.MAX_TOKENS


def test_random_build_has_the_same_architecture(spec, pipe):
    rand = spec.build_random(torch.float32)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(rand, part).state_dict(), getattr(pipe, part).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_tokenizer_is_word_level_and_shared_with_mini_clip(pipe):
    _, clip_tokenizer = mini_clip.load_mini_clip()
    for word in world.words():
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    texts = world.all_captions("all")[::37] + [""]
    assert torch.equal(mini_clip.tokenize(pipe.tokenizer, texts),
                       mini_clip.tokenize(clip_tokenizer, texts))


def test_text_encoder_is_a_mini_clip_text_tower(pipe):
    """The pipeline's text encoder is mini-CLIP's text tower after the joint phase (the UNet was
    trained on it); the metrics' mini-CLIP is the same model after the zero-shot tuning phase:
    same architecture and tokenizer, weights moved on from the pipeline's."""
    clip, tokenizer = mini_clip.load_mini_clip()
    ignore = {"architectures": None, "_name_or_path": None}
    assert pipe.text_encoder.config.to_dict() | ignore == clip.config.text_config.to_dict() | ignore
    assert pipe.tokenizer.get_vocab() == tokenizer.get_vocab()
    ours, tuned = pipe.text_encoder.state_dict(), clip.text_model.state_dict()
    assert ours.keys() == tuned.keys()
    assert all(ours[k].shape == tuned[k].shape for k in ours)


def test_loads_offline_and_generates_through_the_harness(spec, pipe):
    kwargs = call_kwargs(spec, ["a large red circle on a blue background"] * 2, [1, 1],
                         spec.steps, spec.guidance, spec.resolution, {})
    images = generate(pipe, StepContext(), kwargs)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
    assert torch.equal(images[0], images[1])  # same seed, same image
    assert images.float().std() > 10  # not a flat image


def test_mini_clip_zero_shot_on_real_images(zeroshot):
    acc = mini_eval.clip_accuracy(zeroshot, n=600, seed=99, split="all")
    assert acc["colour"] >= FLOOR_CLIP_COLOUR and acc["shape"] >= FLOOR_CLIP_SHAPE, acc


def test_vae_reconstruction_psnr(pipe):
    assert mini_eval.vae_psnr(pipe.vae, n=200, seed=98) >= FLOOR_PSNR


def test_quality_gate_prompt_adherence(pipe, zeroshot):
    """64 generated images (25 DDIM steps, guidance 5): colour and shape right by mini-CLIP."""
    seen = mini_eval.adherence(pipe, zeroshot, 48, "train", seed=0)
    held = mini_eval.adherence(pipe, zeroshot, 16, "heldout", seed=0)
    assert seen["colour_shape"] >= FLOOR_SEEN, {k: v for k, v in seen.items() if k != "images"}
    assert held["colour_shape"] >= FLOOR_HELDOUT, {k: v for k, v in held.items() if k != "images"}
