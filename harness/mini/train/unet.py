"""Stage `unet`: mini-UNet on VAE latents, frozen mini-CLIP text, epsilon objective, EMA."""

from __future__ import annotations

import argparse
import time
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


def frozen_parts(work: Path) -> tuple[Any, Any, Any]:
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    """The phase-1 mini-CLIP (its text tower conditions the UNet), its tokenizer and the VAE."""
    clip_dir, vae_dir = work / "clip" / "joint", work / "vae" / "final"
    for d, stage in ((clip_dir, "clip"), (vae_dir, "vae")):
        if not (d / "config.json").is_file():
            raise SystemExit(f"the unet stage needs the {stage} stage first ({d} is missing)")
    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    return clip, tokenizer, vae


def latent_pool(args: argparse.Namespace, work: Path, vae: Any) -> dict[str, Any]:
    """VAE posterior mean / std of `--pool` training images and their caption indices (cached)."""
    import torch
    from safetensors.torch import load_file, save_file

    from harness.mini import world

    path = work / "unet" / f"latents-{args.pool}.safetensors"
    if path.is_file():
        return load_file(str(path))
    index = {c: i for i, c in enumerate(world.all_captions("all"))}
    means, stds, caps, chunk = [], [], [], 4096
    t0 = time.monotonic()
    for k, start in enumerate(range(0, args.pool, chunk)):
        batch = world.sample(min(chunk, args.pool - start), stage_seed(args.seed, "unet", k),
                             "train")
        with torch.no_grad():
            post = vae.encode(batch.float_images() * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        caps.append(torch.tensor([index[c] for c in batch.captions]))
        log(f"[unet] encoding latents {start + len(batch)}/{args.pool} "
            f"({fmt_time(time.monotonic() - t0)})")
    pool = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
            "caption": torch.cat(caps)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pool, str(path))
    return pool


def stage_unet(args: argparse.Namespace, work: Path) -> None:
    import copy

    import torch

    from harness.mini import clip as mini_clip
    from harness.mini import pipeline as mini_sd
    from harness.mini import world

    final = work / "unet" / "final"
    if (final / "config.json").is_file() and not args.force:
        log(f"[unet] done already: {final}")
        return
    clip, tokenizer, vae = frozen_parts(work)
    scaling = vae.config.scaling_factor
    captions = world.all_captions("all") + [""]  # the last one: the unconditional caption
    with torch.no_grad():
        ids = mini_clip.tokenize(tokenizer, captions)
        table = clip.text_model(input_ids=ids).last_hidden_state  # what the pipeline feeds in
    empty = len(captions) - 1
    pool = latent_pool(args, work, vae)
    del clip, vae

    unet = mini_sd.build_parts(args.seed)["unet"]
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"[unet] UNet2DConditionModel {n_params / 1e6:.2f}M parameters, {args.unet_steps} steps "
        f"of {args.unet_batch}, latent scaling {scaling}, pool {len(pool['caption'])}")
    sched = mini_sd.ddim_scheduler()  # same betas as DDPM training (scaled_linear, 1000 steps)
    alphas = sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)

    def step_fn(step: int) -> float:
        gen = torch.Generator().manual_seed(stage_seed(args.seed, "unet", step))
        n = args.unet_batch
        pick = torch.randint(len(pool["caption"]), (n,), generator=gen)
        mean, std = pool["mean"][pick], pool["std"][pick]
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        t = torch.randint(0, len(alphas), (n,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cap = pool["caption"][pick].clone()
        cap[torch.rand(n, generator=gen) < args.cfg_drop] = empty
        pred = unet(zt, t, encoder_hidden_states=table[cap]).sample
        loss = (pred - noise).pow(2).mean()
        return optimizer_step(opt, unet, loss)

    state = train_loop("unet", args, work, args.unet_steps, {"unet": unet, "ema": ema}, opt,
                       step_fn, args.unet_lr, after_step=ema_updater(unet, ema, args.ema))
    ema.save_pretrained(str(final), safe_serialization=True)
    write_info(final, state, parameters=n_params, batch=args.unet_batch, ema=args.ema,
               cfg_drop=args.cfg_drop, pool=args.pool)
    log(f"[unet] saved EMA weights {final} after {fmt_time(state['seconds'])}")
