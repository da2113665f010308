"""Stage `vae`: mini-VAE (AutoencoderKL 32x32x3 -> 8x8x4), MSE + L1 + tiny KL."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.mini.train.loop import fmt_time, log, stage_seed, train_loop, write_info


def stage_vae(args: argparse.Namespace, work: Path) -> None:
    import torch

    from harness.mini import pipeline as mini_sd
    from harness.mini import world

    final = work / "vae" / "final"
    if (final / "config.json").is_file() and not args.force:
        log(f"[vae] done already: {final}")
        return
    vae = mini_sd.build_parts(args.seed)["vae"]
    vae.train()
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"[vae] AutoencoderKL {n_params / 1e6:.2f}M parameters, {args.vae_steps} steps of "
        f"{args.vae_batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)

    def step_fn(step: int) -> float:
        seed = stage_seed(args.seed, "vae", step)
        x = world.sample(args.vae_batch, seed, "train").float_images() * 2 - 1
        posterior = vae.encode(x).latent_dist
        gen = torch.Generator().manual_seed(seed)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = (recon - x).pow(2).mean()
        loss = mse + 0.1 * (recon - x).abs().mean() + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return float(mse.detach())

    state = train_loop("vae", args, work, args.vae_steps, {"vae": vae}, opt, step_fn, args.vae_lr)
    vae.eval()
    # Scaling factor: unit variance of the (sampled) latents, as SD's 0.18215 was chosen.
    with torch.no_grad():
        x = world.sample(4096, stage_seed(args.seed, "vae", 10**9), "all").float_images() * 2 - 1
        z = torch.cat([vae.encode(c).latent_dist.sample() for c in x.split(512)])
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    vae.save_pretrained(str(final), safe_serialization=True)
    write_info(final, state, parameters=n_params, batch=args.vae_batch, scaling_factor=scaling,
               latent_mean=float(z.mean()))
    log(f"[vae] saved {final} after {fmt_time(state['seconds'])}; scaling factor {scaling:.5f}")
