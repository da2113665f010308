"""Flow-matching zoo (FLUX.1-dev/schnell, SD3.5-medium) and its tiny builds (tiny-flux, tiny-sd3).

The big models are built only on the meta device or under fake tensors: no weight is allocated.
Expected counts, re-derived from the configs (the published checkpoints' sizes):
- FLUX.1-dev transformer 11,901,408,320 (the "12B"/11.9B of the release) = 19 double blocks x
  339,831,296 + 38 single blocks x 141,591,808 + 64,124,992 (embedders, guidance embedder,
  final layer); schnell has no guidance embedder (10,229,760): 11,891,178,560.
- SD3.5-medium transformer 2,243,171,520 parameters = 13 dual-attention blocks x 101,506,944 +
  10 blocks x 84,980,992 + the last (context_pre_only) 54,294,784 + 19,476,544; with the
  checkpoint's persistent sin-cos position table (384 x 384 x 1536 = 226,492,416, a buffer) it
  holds 2,469,663,936 values: the model card's "2.5B".
- CLIP-L text 123,060,480 (+ 768 x 768 projection in SD3: 123,650,304), OpenCLIP bigG with
  projection 694,659,840, T5-v1.1-XXL encoder 4,762,310,656 (as tests/harness/models/test_zoo.py).
- The 16-channel VAE 83,819,683 = the SD VAE's 83,653,863 without its quant convs (-92) and with
  16 latent channels in the encoder's last conv (+110,616) and the decoder's first (+55,296).
The rough checks against the published (rounded) sizes catch a wrong layer count on their own
too: FLUX's 11.9B within 0.5 % (one block is >= 1.19 % of it), SD3.5-medium's 2.5B within 2 %
(the count with its position table is 1.2 % below; one more or one fewer block, >= 85M, moves it
beyond 2 %).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.arch_flops import fake_pipeline
from harness.cli import main
from harness.models import MODELS, load_pipeline
from harness.models import flow_zoo as fz
from harness.models import zoo as model_zoo
from harness.run.generate import call_kwargs, generate
from harness.steps import StepContext

T5_XXL, CLIP_L, VAE16 = 4_762_310_656, 123_060_480, 83_819_683
EXPECTED = {
    "flux-dev": {"transformer": 11_901_408_320, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL,
                 "vae": VAE16},
    "flux-schnell": {"transformer": 11_891_178_560, "text_encoder": CLIP_L,
                     "text_encoder_2": T5_XXL, "vae": VAE16},
    "sd3.5-medium": {"transformer": 2_243_171_520, "text_encoder": CLIP_L + 768 * 768,
                     "text_encoder_2": 694_659_840, "text_encoder_3": T5_XXL, "vae": VAE16},
}
# published transformer sizes and the tolerance that still catches one block more or fewer
PUBLISHED = {"flux-dev": (11.9e9, 0.005), "flux-schnell": (11.9e9, 0.005),
             "sd3.5-medium": (2.5e9, 0.02)}
SD35_POS_EMBED = 384 * 384 * 1536


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache
def meta_pipeline(name: str):
    """The full-size pipeline on the meta device: parameters and buffers (SD3.5's 226M-entry
    position table too) are never allocated or computed."""
    with torch.device("meta"):
        return MODELS.get(name).build_random(torch.bfloat16)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_parameter_counts(name):
    pipe = meta_pipeline(name)
    counts = {key: n_params(getattr(pipe, key)) for key in EXPECTED[name]}
    assert counts == EXPECTED[name]
    transformer = n_params(pipe.transformer) + sum(b.numel() for b in pipe.transformer.buffers())
    published, tolerance = PUBLISHED[name]
    assert abs(transformer / published - 1) < tolerance, transformer
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16
               for m in pipe.components.values() if isinstance(m, torch.nn.Module)
               for p in m.parameters())
    assert type(pipe).__name__ == MODELS.get(name).pipeline_class


def test_block_layout():
    flux = meta_pipeline("flux-dev").transformer
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (19, 38)
    assert flux.config.guidance_embeds and not meta_pipeline("flux-schnell").transformer.config \
        .guidance_embeds
    sd35 = meta_pipeline("sd3.5-medium").transformer
    assert len(sd35.transformer_blocks) == 24
    assert [b.use_dual_attention for b in sd35.transformer_blocks] == [True] * 13 + [False] * 11
    assert sd35.pos_embed.pos_embed.numel() == SD35_POS_EMBED


def test_vae_and_scheduler_configs():
    flux, schnell, sd35 = (meta_pipeline(n) for n in ("flux-dev", "flux-schnell", "sd3.5-medium"))
    assert (flux.vae.config.scaling_factor, flux.vae.config.shift_factor) == (0.3611, 0.1159)
    assert (sd35.vae.config.scaling_factor, sd35.vae.config.shift_factor) == (1.5305, 0.0609)
    for pipe in (flux, sd35):
        assert pipe.vae.config.latent_channels == 16
        assert pipe.vae.quant_conv is None and pipe.vae.post_quant_conv is None
    dev = flux.scheduler.config
    assert dev.use_dynamic_shifting and (dev.base_shift, dev.max_shift) == (0.5, 1.15)
    assert (dev.base_image_seq_len, dev.max_image_seq_len, dev.shift) == (256, 4096, 3.0)
    assert not schnell.scheduler.config.use_dynamic_shifting and schnell.scheduler.config.shift == 1
    assert sd35.scheduler.config.shift == 3.0 and not sd35.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("name,hub_id,steps,guidance,t5_tokens", [
    ("flux-dev", "black-forest-labs/FLUX.1-dev", 28, 3.5, 512),
    ("flux-schnell", "black-forest-labs/FLUX.1-schnell", 4, 0.0, 256),
    ("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", 40, 4.5, 256),
])
def test_specs(name, hub_id, steps, guidance, t5_tokens):
    spec = MODELS.get(name)
    assert (spec.hub_id, spec.resolution, spec.steps, spec.guidance) == (hub_id, 1024, steps,
                                                                         guidance)
    assert spec.resolution_multiple == 16 and spec.default_weights == "pretrained"
    kwargs = call_kwargs(spec, ["a cat"], [1], steps, guidance, 1024, {})
    assert kwargs["max_sequence_length"] == t5_tokens and kwargs["output_type"] == "pt"


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium"])
def test_builds_under_fake_tensors(name):
    from torch._subclasses.fake_tensor import FakeTensor

    pipe, _ = fake_pipeline(MODELS.get(name), torch.bfloat16)
    params = list(pipe.transformer.parameters())
    assert all(isinstance(p, FakeTensor) and p.dtype == torch.bfloat16 for p in params)


# --- the real builders with tiny stand-in configs: assembly and call arguments really run ---
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                 projection_dim=16, hidden_act="gelu")
TINY_VAE16 = {**fz.FLOW_VAE, "block_out_channels": (8, 8), "norm_num_groups": 4,
              "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2}
TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
ZOO = {"CLIP_L": TINY_CLIP, "OPENCLIP_BIGG": TINY_CLIP,
       "T5_XXL": {**model_zoo.T5_XXL, "d_model": 32, "d_kv": 4, "d_ff": 32, "num_layers": 1,
                  "num_heads": 2}}
FLOW = {"FLUX_DEV_TRANSFORMER": {**fz.FLUX_DEV_TRANSFORMER, **TINY_FLUX, "joint_attention_dim": 32},
        "FLUX_SCHNELL_TRANSFORMER": {**fz.FLUX_SCHNELL_TRANSFORMER, **TINY_FLUX,
                                     "joint_attention_dim": 32},
        "SD35_MEDIUM_TRANSFORMER": {**fz.SD35_MEDIUM_TRANSFORMER, "sample_size": 8,
                                    "num_layers": 2, "attention_head_dim": 8,
                                    "num_attention_heads": 2, "joint_attention_dim": 32,
                                    "caption_projection_dim": 16, "pooled_projection_dim": 32,
                                    "pos_embed_max_size": 16, "dual_attention_layers": (0,)},
        "FLUX_VAE": {**TINY_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        "SD35_VAE": {**TINY_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609}}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builder_assembles_a_pipeline_that_runs(name, monkeypatch):
    for module, constants in ((model_zoo, ZOO), (fz, FLOW)):
        for constant, value in constants.items():
            monkeypatch.setattr(module, constant, value)
    spec = MODELS.get(name)
    pipe = load_pipeline(spec, "none", torch.float32, "cpu")
    kwargs = call_kwargs(spec, ["a red circle", "3"], [1, 2], 2, spec.guidance, 16,
                         {"max_sequence_length": 8})
    assert generate(pipe, StepContext(), kwargs).shape == (2, 16, 16, 3)


# --- tiny builds ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,pipeline", [("tiny-flux", "FluxPipeline"),
                                           ("tiny-sd3", "StableDiffusion3Pipeline")])
def test_tiny_builds_generate_deterministically(name, pipeline):
    spec = MODELS.get(name)
    assert (spec.default_weights, spec.has_quality, spec.resolution) == ("none", False, 32)
    images = []
    for _ in range(2):  # two separate builds: seeded weights, per-image seeds
        pipe = load_pipeline(spec, "none", torch.float32, "cpu")
        assert type(pipe).__name__ == pipeline
        kwargs = call_kwargs(spec, ["a red circle", "a blue square"], [1, 2], 2, spec.guidance,
                             spec.resolution, {})
        images.append(generate(pipe, StepContext(), kwargs))
    assert images[0].shape == (2, 32, 32, 3) and images[0].dtype == torch.uint8
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0][0], images[0][1])


def test_tiny_sd3_runs_all_three_encoders_and_a_dual_attention_block():
    pipe = load_pipeline(MODELS.get("tiny-sd3"), "none", torch.float32, "cpu")
    assert pipe.text_encoder_3 is not None
    assert [b.use_dual_attention for b in pipe.transformer.transformer_blocks] == [True, False,
                                                                                   False]


def test_list_models_shows_the_new_entries(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    for name in ("flux-dev", "flux-schnell", "sd3.5-medium", "tiny-flux", "tiny-sd3"):
        assert name in out
