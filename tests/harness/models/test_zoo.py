"""Model zoo: published parameter counts (built on the meta device), specs, call arguments.

Expected counts are those of the published checkpoints, each re-derived by hand from the config:
- SD-1.5 UNet 859,520,964 and SD-2.1 UNet 865,910,724 (the "860M"/"865M" of the model cards),
  SDXL base UNet 2,567,463,684 (the "2.6B" of the SDXL paper).
- CLIP ViT-L/14 text 123,060,480 = 49408*768 + 77*768 + 12 layers * 7,087,872 + 1,536.
- OpenCLIP ViT-H text (23 layers) 340,387,840; OpenCLIP bigG text + projection 694,659,840.
- T5-v1.1-XXL encoder 4,762,310,656 = 32128*4096 + 24 * 192,946,176 + 2,048 + 4,096.
- KL-f8 VAE 83,653,863 (SD, SDXL and sd-vae-ft-ema share the architecture).
- PixArt-alpha XL/2 transformer 610,856,096 (the paper's "0.6B"/611M).
- DiT-XL/2: the DiT repo prints 675,129,632 parameters, of which 294,912 are its frozen sin-cos
  position table (a buffer in diffusers): 674,834,720 trainable. diffusers' DiTTransformer2DModel
  keeps a copy of the timestep + class embedder in each of its 28 blocks, so it holds
  749,826,464 = 674,834,720 + 27 copies of that 2,777,472-parameter embedder.
"""

from __future__ import annotations

import functools

import pytest
import torch

from harness.errors import DiffbenchError
from harness.models import MODELS, load_pipeline, weights_source
from harness.models import zoo as model_zoo
from harness.run.generate import call_kwargs, to_uint8

CLIP_L, VAE = 123_060_480, 83_653_863
EXPECTED = {
    "sd15": {"unet": 859_520_964, "text_encoder": CLIP_L, "vae": VAE},
    "sd21": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": VAE},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": CLIP_L, "text_encoder_2": 694_659_840,
             "vae": VAE},
    "pixart-alpha": {"transformer": 610_856_096, "text_encoder": 4_762_310_656, "vae": VAE},
    "dit-xl-2": {"transformer": 749_826_464, "vae": VAE},
}
DIT_REPO_COUNT, DIT_POS_EMBED = 675_129_632, 256 * 1152


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache
def meta_pipeline(name: str):
    """The full-size pipeline with every parameter on the meta device (no memory, no init)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return MODELS.get(name).build_random(torch.float16)


def test_all_models_are_registered():
    assert {"tiny-sd", *EXPECTED} <= set(MODELS.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_parameter_counts(name):
    pipe = meta_pipeline(name)
    counts = {key: n_params(getattr(pipe, key)) for key in EXPECTED[name]}
    assert counts == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_meta_build_keeps_dtype_and_allocates_nothing(name):
    pipe = meta_pipeline(name)
    params = [p for _, m in pipe.components.items() if isinstance(m, torch.nn.Module)
              for p in m.parameters()]
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in params)
    assert type(pipe).__name__ == MODELS.get(name).pipeline_class


def test_dit_count_matches_the_dit_repository():
    transformer = meta_pipeline("dit-xl-2").transformer
    embedder = n_params(transformer.transformer_blocks[0].norm1.emb)
    assert embedder == 2_777_472
    assert n_params(transformer) - 27 * embedder == DIT_REPO_COUNT - DIT_POS_EMBED


def test_t5_input_embedding_is_the_shared_one():
    encoder = meta_pipeline("pixart-alpha").text_encoder
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight


@pytest.mark.parametrize("name,hub_id,resolution", [
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    ("sd21", "stabilityai/stable-diffusion-2-1", 768),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
    ("pixart-alpha", "PixArt-alpha/PixArt-XL-2-512x512", 512),
    ("dit-xl-2", "facebook/DiT-XL-2-256", 256),
])
def test_specs_default_to_pretrained_hub_weights(name, hub_id, resolution):
    spec = MODELS.get(name)
    assert (spec.hub_id, spec.resolution) == (hub_id, resolution)
    assert spec.default_weights == "pretrained"
    assert weights_source(spec, None) == hub_id and weights_source(spec, "none") == "none"
    assert spec.has_quality and spec.description
    assert spec.conditioning == ("class" if name == "dit-xl-2" else "text")


def test_sd21_scheduler_predicts_v():
    assert meta_pipeline("sd21").scheduler.config.prediction_type == "v_prediction"


def test_missing_local_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-weights"
    with pytest.raises(DiffbenchError, match=f"not found: no folder at {missing}"):
        load_pipeline(MODELS.get("sd15"), str(missing), torch.float32, "cpu")


def test_pixart_call_disables_binning_and_caption_cleaning():
    kwargs = call_kwargs(MODELS.get("pixart-alpha"), ["a cat"], [3], 20, 4.5, 512, {})
    assert kwargs["use_resolution_binning"] is False and kwargs["clean_caption"] is False
    assert kwargs["output_type"] == "pt" and kwargs["prompt"] == ["a cat"]


def test_dit_maps_prompts_to_stable_imagenet_classes():
    kwargs = call_kwargs(MODELS.get("dit-xl-2"), ["207", " 7 ", "a golden retriever"], [1, 2, 3],
                         50, 4.0, 256, {})
    labels = kwargs["class_labels"]
    assert labels[:2] == [207, 7] and 0 <= labels[2] < 1000
    assert labels[2] == model_zoo.class_label("a golden retriever")  # a stable hash
    assert "prompt" not in kwargs and kwargs["output_type"] == "pt"
    with pytest.raises(DiffbenchError, match="class id 1000 is out of range"):
        model_zoo.class_label("1000")


# --- the same builders with tiny stand-in configs: assembly and call arguments really run ---
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                 projection_dim=16, hidden_act="gelu")
TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=4,
                 norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_TRANSFORMER = dict(sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8)
TINY = {
    "SD_VAE": {**model_zoo.SD_VAE, "block_out_channels": (8, 8), "norm_num_groups": 4,
               "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
               "up_block_types": ("UpDecoderBlock2D",) * 2},
    "CLIP_L": TINY_CLIP, "OPENCLIP_H": TINY_CLIP, "OPENCLIP_BIGG": TINY_CLIP,
    "SD15_UNET": {**model_zoo.SD15_UNET, **TINY_UNET, "cross_attention_dim": 16},
    "SD21_UNET": {**model_zoo.SD21_UNET, **TINY_UNET, "cross_attention_dim": 16,
                  "attention_head_dim": (2, 4)},
    "SDXL_UNET": {**model_zoo.SDXL_UNET, **TINY_UNET, "cross_attention_dim": 32,
                  "transformer_layers_per_block": 1, "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 6 * 8 + 16,
                  "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                  "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")},
    "T5_XXL": {**model_zoo.T5_XXL, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
               "num_heads": 2},
    "PIXART_XL2_512": {**model_zoo.PIXART_XL2_512, **TINY_TRANSFORMER,
                       "cross_attention_dim": 16, "caption_channels": 16},
    "DIT_XL2_256": {**model_zoo.DIT_XL2_256, **TINY_TRANSFORMER},
}
TINY["SDXL_VAE"] = {**TINY["SD_VAE"], "scaling_factor": 0.13025}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builder_assembles_a_pipeline_that_runs(name, monkeypatch):
    for constant, value in TINY.items():
        monkeypatch.setattr(model_zoo, constant, value)
    spec = MODELS.get(name)
    pipe = load_pipeline(spec, "none", torch.float32, "cpu")
    images = pipe(**call_kwargs(spec, ["a red circle", "3"], [1, 2], 2, spec.guidance, 16, {}))
    assert to_uint8(images.images).shape == (2, 16, 16, 3)
