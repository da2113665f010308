"""Stage `assemble`: the pipeline folder and the scoring CLIP, safetensors only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.mini.train.loop import log
from harness.mini.train.unet import frozen_parts


def stage_assemble(args: argparse.Namespace, work: Path) -> None:
    import shutil

    from diffusers import UNet2DConditionModel

    from harness.mini import paths
    from harness.mini import pipeline as mini_sd

    out = Path(args.out) if args.out else paths.ASSETS
    clip, tokenizer, vae = frozen_parts(work)
    unet_dir = work / "unet" / "final"
    if not (unet_dir / "config.json").is_file():
        raise SystemExit(f"assemble needs the unet stage first ({unet_dir} is missing)")
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir)).eval()
    pipe = mini_sd.assemble_pipeline(tokenizer, clip, vae, unet)
    pipe_dir, clip_dir = out / paths.PIPELINE_DIR.name, out / paths.CLIP_DIR.name
    for d in (pipe_dir, clip_dir):
        if d.exists():
            shutil.rmtree(d)
    pipe.save_pretrained(str(pipe_dir), safe_serialization=True)
    # The scoring CLIP: phase 2 (fine-tuned with hard negatives); the pipeline keeps phase 1's
    # text tower, the one the UNet was trained with.
    from transformers import CLIPModel

    scorer_dir = work / "clip" / "final"
    if not (scorer_dir / "config.json").is_file():
        raise SystemExit(f"assemble needs the clip stage first ({scorer_dir} is missing)")
    CLIPModel.from_pretrained(str(scorer_dir)).save_pretrained(str(clip_dir),
                                                               safe_serialization=True)
    tokenizer.save_pretrained(str(clip_dir))
    info = {stage: json.loads((work / stage / "final" / "train_info.json").read_text())
            for stage in ("clip", "vae", "unet")}
    info["command"] = "diffbench train-mini " + " ".join(sys.argv[1:])
    (pipe_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    total = sum(f.stat().st_size for d in (pipe_dir, clip_dir) for f in d.rglob("*") if f.is_file())
    log(f"[assemble] wrote {pipe_dir} and {clip_dir} ({total / 2**20:.1f} MiB together)")
