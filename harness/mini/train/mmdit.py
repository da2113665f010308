"""Stage `mmdit`: mini-sd3's MMDiT on mini-sd's VAE latents and frozen text tower, rectified flow.

Esser et al. 2024 (arXiv 2403.03206), eq. 2-3 and sec. 3.1: x_t = (1 - s) x0 + s eps, the model
predicts the velocity eps - x0, s ~ logit-normal(0, 1); EMA weights; captions dropped to the
empty caption with probability `cfg_drop` for classifier-free guidance. The text conditioning
is computed by the pipeline's own `encode_prompt`, so training sees exactly what sampling feeds.
Stage `assemble-mmdit` writes the `StableDiffusion3Pipeline` folder `assets/mini-sd3`.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from harness.mini.train.loop import (
    ema_updater,
    fmt_time,
    log,
    optimizer_step,
    stage_seed,
    train_loop,
    write_info,
)
from harness.mini.train.unet import latent_pool


def caption_table(pipe: Any) -> tuple[Any, Any, int]:
    """(prompt embeddings, pooled embeddings) of every world caption and the empty one, as
    the pipeline computes them; the empty caption's row index."""
    import torch

    from harness.mini import mmdit, world

    captions = world.all_captions("all") + [""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, captions, None, do_classifier_free_guidance=False,
            max_sequence_length=mmdit.MAX_SEQUENCE_LENGTH)
    return embeds, pooled, len(captions) - 1


def stage_mmdit(args: argparse.Namespace, work: Path) -> None:
    import torch

    from harness.mini import mmdit

    final = work / "mmdit" / "final"
    if (final / "config.json").is_file() and not args.force:
        log(f"[mmdit] done already: {final}")
        return
    tokenizer, text_encoder, vae = mmdit.frozen_parts()
    transformer = mmdit.build_transformer(args.seed)
    pipe = mmdit.assemble_sd3(tokenizer, text_encoder, vae, transformer)
    embeds, pooled, empty = caption_table(pipe)
    shift, scaling = mmdit.LATENT_SHIFT, pipe.vae.config.scaling_factor
    pool = latent_pool(args, work, vae)  # the unet stage's pool: same VAE, same training images
    del text_encoder, pipe
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in transformer.parameters())
    log(f"[mmdit] SD3Transformer2DModel {n_params / 1e6:.2f}M parameters, {args.mmdit_steps} "
        f"steps of {args.mmdit_batch}, latent shift {shift} scaling {scaling}, "
        f"pool {len(pool['caption'])}")
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.mmdit_lr, weight_decay=0.0)

    def step_fn(step: int) -> float:
        gen = torch.Generator().manual_seed(stage_seed(args.seed, "mmdit", step))
        n = args.mmdit_batch
        pick = torch.randint(len(pool["caption"]), (n,), generator=gen)
        mean, std = pool["mean"][pick], pool["std"][pick]
        x0 = (mean + std * torch.randn(mean.shape, generator=gen) - shift) * scaling
        s = torch.sigmoid(torch.randn(n, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        cap = pool["caption"][pick].clone()
        cap[torch.rand(n, generator=gen) < args.cfg_drop] = empty
        pred = transformer(hidden_states=xt, encoder_hidden_states=embeds[cap],
                           pooled_projections=pooled[cap], timestep=s * 1000).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        return optimizer_step(opt, transformer, loss)

    state = train_loop("mmdit", args, work, args.mmdit_steps, {"mmdit": transformer, "ema": ema},
                       opt, step_fn, args.mmdit_lr,
                       after_step=ema_updater(transformer, ema, args.ema))
    ema.save_pretrained(str(final), safe_serialization=True)
    write_info(final, state, parameters=n_params, batch=args.mmdit_batch, ema=args.ema,
               cfg_drop=args.cfg_drop, pool=args.pool, lr=args.mmdit_lr)
    log(f"[mmdit] saved EMA weights {final} after {fmt_time(state['seconds'])}")


def stage_assemble_mmdit(args: argparse.Namespace, work: Path) -> None:
    """The pipeline folder: mini-sd's tokenizer, text tower and VAE, the trained MMDiT."""
    from diffusers import SD3Transformer2DModel

    from harness.mini import mmdit, paths

    out = (Path(args.out) if args.out else paths.ASSETS) / paths.MMDIT_DIR.name
    source = work / "mmdit" / "final"
    if not (source / "config.json").is_file():
        raise SystemExit(f"assemble-mmdit needs the mmdit stage first ({source} is missing)")
    tokenizer, text_encoder, vae = mmdit.frozen_parts()
    transformer = SD3Transformer2DModel.from_pretrained(str(source)).eval()
    pipe = mmdit.assemble_sd3(tokenizer, text_encoder, vae, transformer)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    info = {"mmdit": json.loads((source / "train_info.json").read_text()),
            "command": "diffbench train-mini " + " ".join(sys.argv[1:])}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"[assemble-mmdit] wrote {out} ({size / 2**20:.1f} MiB)")
