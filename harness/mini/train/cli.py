"""`diffbench train-mini`: arguments and the stage dispatch of the mini model's training."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from harness.mini import train
from harness.mini.train.assemble import stage_assemble
from harness.mini.train.clip import stage_clip, stage_clip_tune
from harness.mini.train.loop import log
from harness.mini.train.mmdit import stage_assemble_mmdit, stage_mmdit
from harness.mini.train.unet import stage_unet
from harness.mini.train.vae import stage_vae

REPO = Path(__file__).resolve().parents[3]
DEFAULT_WORK = REPO / ".mini-work"
STAGES = ("clip", "vae", "unet", "clip-tune", "assemble")  # mini-sd ("--stage all")
MMDIT_STAGES = ("mmdit", "assemble-mmdit")  # mini-sd3, beside mini-sd's shipped parts
DEFAULTS = dict(clip_steps=800, clip_batch=256, clip_lr=1e-3,
                clip_tune_steps=2500, clip_tune_lr=1e-3,
                vae_steps=2200, vae_batch=64, vae_lr=1e-3,
                unet_steps=7500, unet_batch=128, unet_lr=5e-4,
                mmdit_steps=4000, mmdit_batch=128, mmdit_lr=3e-4,
                pool=160_000, ema=0.999, cfg_drop=0.1, kl_weight=1e-6)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=(*STAGES, "all", *MMDIT_STAGES, "all-mmdit"),
                   default="all", help="all: mini-sd; all-mmdit: mini-sd3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints and stage results")
    p.add_argument("--out", default=None, help="assets folder (default: harness/mini/assets)")
    p.add_argument("--force", action="store_true", help="redo stages whose result exists")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=50)
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `train-mini` sub-command; its handler is `run(args)`."""
    p = subparsers.add_parser("train-mini", help="train the embedded mini-sd model (CPU, ~1 h)",
                              description=train.__doc__.splitlines()[0])
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = {"all": STAGES, "all-mmdit": MMDIT_STAGES}.get(args.stage, (args.stage,))
    log(f"train-mini: stages {', '.join(stages)}, seed {args.seed}, "
        f"{torch.get_num_threads()} threads, work {work}")
    for stage in stages:
        STAGE_FUNCS[stage](args, work)
    return 0


STAGE_FUNCS = {"clip": stage_clip, "vae": stage_vae, "unet": stage_unet,
               "clip-tune": stage_clip_tune, "assemble": stage_assemble,
               "mmdit": stage_mmdit, "assemble-mmdit": stage_assemble_mmdit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffbench train-mini",
                                     description=train.__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
