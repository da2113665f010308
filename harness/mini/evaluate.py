"""Measurements of the embedded `mini-sd` model (offline, CPU).

- mini-CLIP zero-shot accuracy of colour, shape (and size, background) on fresh real images
  of the world, seen and held-out combinations: each image is scored against every caption of
  the world (5 x 8 x 2 x 7 = 560 prompt templates over the vocabulary) and an attribute is
  predicted by summing the caption probabilities that share its value;
- mini-VAE reconstruction PSNR on fresh images;
- prompt adherence of generated images (the model's steps and guidance), scored like the
  `adherence` metric (harness/mini/adherence.py): the fraction whose colour, shape and size, judged
  by mini-CLIP zero-shot, all match the prompt, colour and shape alone, and each attribute;
  seen and held-out combos.

    python -m harness.mini.evaluate [--n-gen 128] [--grid leaderboards/mini-sd-grid.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.mini import world
from harness.mini.zeroshot import ATTRIBUTES, ZeroShot
from harness.seeds import image_seed


def clip_accuracy(zs: ZeroShot, n: int = 2000, seed: int = 12345,
                  split: str = "all") -> dict[str, float]:
    """Zero-shot accuracy of each attribute on n fresh real images of a split."""
    batch = world.sample(n, seed, split)
    pred = zs.predict(batch.float_images())
    return {name: float((pred[name] == getattr(batch, name)).float().mean())
            for name in ATTRIBUTES}


def vae_psnr(vae: Any, n: int = 1000, seed: int = 23456, split: str = "all") -> float:
    """Mean per-image PSNR (dB, images in [0, 1]) of VAE reconstructions (posterior mean)."""
    x = world.sample(n, seed, split).float_images()
    out = []
    with torch.no_grad():
        for chunk in x.split(250):
            z = vae.encode(chunk * 2 - 1).latent_dist.mean
            recon = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
            mse = (recon - chunk).pow(2).flatten(1).mean(1).clamp(min=1e-10)
            out.append(10 * torch.log10(1 / mse))
    return float(torch.cat(out).mean())


def eval_prompts(n: int, seed: int, split: str) -> world.Batch:
    """n captions (with their attributes) of a split, drawn like training data."""
    return world.sample(n, seed, split)


def generate(pipe: Any, captions: list[str], seed: int = 0, steps: int = 25,
             guidance: float = 5.0, batch_size: int = 64, model: str = "mini-sd") -> torch.Tensor:
    """Float [0, 1] N x 3 x 32 x 32 images; image i uses generator seed (seed, i); the call
    arguments are the model's (ModelSpec.call_kwargs), as in a diffbench run."""
    from harness.models import MODELS

    call = MODELS.get(model).call_kwargs
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        gens = [torch.Generator().manual_seed(image_seed(seed, start + i))
                for i in range(len(chunk))]
        with torch.inference_mode():
            images = pipe(**call(chunk, steps, guidance, world.RESOLUTION, gens)).images
        out.append(images.float().cpu())
    return torch.cat(out)


def adherence(pipe: Any, zs: ZeroShot, n: int, split: str, seed: int = 0, steps: int = 25,
              guidance: float = 5.0, model: str = "mini-sd") -> dict[str, Any]:
    """Shares of generated images whose attributes (mini-CLIP zero-shot) match their prompts,
    scored as the `adherence` metric scores them (harness/mini/adherence.py): `adherence`
    (colour, shape and size), `colour_shape`, each attribute, and `heldout` (all three,
    held-out combinations)."""
    from harness.mini.adherence import ATTRIBUTES, adherence_flags, adherence_shares

    prompts = eval_prompts(n, 777 + seed, split)
    images = generate(pipe, prompts.captions, seed, steps, guidance, model=model)
    rows = adherence_flags(zs.predict(images), prompts.captions)
    shares = adherence_shares(rows)
    every = adherence_shares(rows, ATTRIBUTES)  # a share per attribute the judge reads
    out = {"adherence": shares["adherence"], "heldout": shares["adherence_heldout"],
           "colour_shape": adherence_shares(rows, ("colour", "shape"))["adherence"]}
    out.update({a: every[f"adherence_{a}"] for a in ATTRIBUTES})
    return {**out, "images": images, "captions": prompts.captions}


def save_grid(images: torch.Tensor, path: str | Path, rows: int = 4, cols: int = 8,
              scale: int = 4) -> None:
    """A rows x cols PNG grid of float [0, 1] N x 3 x 32 x 32 images, each upscaled."""
    from PIL import Image

    n, c, h, w = images.shape
    x = (images[:rows * cols].clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray(x.numpy()).resize((cols * w * scale, rows * h * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def load_pipe(model: str = "mini-sd") -> Any:
    from harness.models import MODELS, load_pipeline, weights_source

    spec = MODELS.get(model)
    return load_pipeline(spec, weights_source(spec, "default"), torch.float32, "cpu")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    p = argparse.ArgumentParser(prog="python -m harness.mini.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini-sd", choices=("mini-sd", "mini-sd3"))
    p.add_argument("--n-clip", type=int, default=2000, help="real images for zero-shot accuracy")
    p.add_argument("--n-vae", type=int, default=1000, help="real images for PSNR")
    p.add_argument("--n-gen", type=int, default=128, help="generated images per split")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grid", default=None, help="write a 4x8 PNG grid of generated images here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from harness.models import MODELS

    spec = MODELS.get(args.model)
    args.steps = args.steps or spec.steps
    args.guidance = spec.guidance if args.guidance is None else args.guidance
    t0 = time.monotonic()
    zs = ZeroShot.load()
    for split in ("all", "heldout"):
        acc = clip_accuracy(zs, args.n_clip, split=split)
        print(f"mini-CLIP zero-shot on {args.n_clip} real {split} images: "
              + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()), flush=True)
    pipe = load_pipe(args.model)
    print(f"mini-VAE PSNR on {args.n_vae} real images: {vae_psnr(pipe.vae, args.n_vae):.2f} dB",
          flush=True)
    for split in ("train", "heldout"):
        t1 = time.monotonic()
        res = adherence(pipe, zs, args.n_gen, split, args.seed, args.steps, args.guidance,
                        args.model)
        label = "seen" if split == "train" else "held-out"
        print(f"{args.model} adherence on {args.n_gen} {label} prompts ({args.steps} steps, "
              f"guidance {args.guidance}): colour+shape+size {res['adherence']:.1%}, "
              f"colour+shape {res['colour_shape']:.1%} (colour {res['colour']:.1%}, shape "
              f"{res['shape']:.1%}, size {res['size']:.1%}, background "
              f"{res['background']:.1%}) in {time.monotonic() - t1:.1f} s", flush=True)
    if args.grid:
        prompts = grid_prompts()
        images = generate(pipe, prompts, args.seed, args.steps, args.guidance, model=args.model)
        save_grid(images, args.grid)
        print(f"grid written to {args.grid}; captions row by row:")
        for r in range(4):
            print("  " + " | ".join(prompts[r * 8:(r + 1) * 8]))
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


def grid_prompts() -> list[str]:
    """32 captions for the showcase grid: every shape and colour, the last row held out."""
    seen = world.sample(24, 4242, "train").captions
    held = world.sample(8, 4243, "heldout").captions
    return seen + held


if __name__ == "__main__":
    sys.exit(main())
