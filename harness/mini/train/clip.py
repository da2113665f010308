"""Stages `clip` and `clip-tune`: mini-CLIP, contrastive, then tuned against all captions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from harness.mini.train.loop import fmt_time, log, stage_seed, train_loop, write_info


def stage_clip(args: argparse.Namespace, work: Path) -> None:
    joint = work / "clip" / "joint"
    if (joint / "config.json").is_file() and not args.force:
        log(f"[clip] done already: {joint}")
        return
    clip_joint(args, work, joint)


def stage_clip_tune(args: argparse.Namespace, work: Path) -> None:
    joint, final = work / "clip" / "joint", work / "clip" / "final"
    if (final / "config.json").is_file() and not args.force:
        log(f"[clip-tune] done already: {final}")
        return
    if not (joint / "config.json").is_file():
        raise SystemExit(f"clip-tune needs the clip stage first ({joint} is missing)")
    clip_tune(args, work, joint, final)


def clip_joint(args: argparse.Namespace, work: Path, joint: Path) -> None:
    """Phase 1: both towers, CLIP's symmetric in-batch contrastive loss."""
    import torch
    import torch.nn.functional as F

    from harness.mini import clip as mini_clip
    from harness.mini import pipeline as mini_sd
    from harness.mini import world

    parts = mini_sd.build_parts(args.seed)
    tokenizer, model = parts["tokenizer"], parts["clip"]
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[clip] CLIPModel {n_params / 1e6:.2f}M parameters, {args.clip_steps} steps of "
        f"{args.clip_batch}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.05)
    cache: dict[str, Any] = {}

    def step_fn(step: int) -> float:
        batch = world.sample(args.clip_batch, stage_seed(args.seed, "clip", step), "train")
        if not cache:
            captions = world.all_captions("all")
            cache["index"] = {c: i for i, c in enumerate(captions)}
            cache["ids"] = mini_clip.tokenize(tokenizer, captions)
        cap = torch.tensor([cache["index"][c] for c in batch.captions])
        img = model.visual_projection(
            model.vision_model(pixel_values=mini_clip.clip_pixels(batch.float_images())).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=cache["ids"][cap]).pooler_output)
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (cap[:, None] == cap[None, :]).float()  # repeated captions are all positives
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    state = train_loop("clip", args, work, args.clip_steps, {"clip": model}, opt, step_fn,
                       args.clip_lr)
    model.eval()
    model.save_pretrained(str(joint), safe_serialization=True)
    tokenizer.save_pretrained(str(joint))
    write_info(joint, state, parameters=n_params, batch=args.clip_batch)
    log(f"[clip] saved {joint} after {fmt_time(state['seconds'])}")


def clip_tune(args: argparse.Namespace, work: Path, joint: Path, final: Path) -> None:
    """Phase 2: both towers learn to pick an image's caption among all 504 training captions
    (hard negatives: captions that differ in the shape alone), which in-batch negatives of
    phase 1 rarely give; the text tower of the result is the pipeline's text encoder."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPTokenizer

    from harness.mini import clip as mini_clip
    from harness.mini import world

    model = CLIPModel.from_pretrained(str(joint))
    tokenizer = CLIPTokenizer.from_pretrained(str(joint))
    model.train()
    captions = world.all_captions("train")  # held-out captions stay unseen, as in phase 1
    index = {c: i for i, c in enumerate(captions)}
    ids = mini_clip.tokenize(tokenizer, captions)
    trainable = list(model.parameters())
    log(f"[clip-tune] both towers against all {len(captions)} captions, "
        f"{args.clip_tune_steps} steps of {args.clip_batch}")
    opt = torch.optim.AdamW(trainable, lr=args.clip_tune_lr, weight_decay=0.05)

    def step_fn(step: int) -> float:
        batch = world.sample(args.clip_batch, stage_seed(args.seed, "clip-tune", step), "train")
        cap = torch.tensor([index[c] for c in batch.captions])
        img = model.visual_projection(
            model.vision_model(pixel_values=mini_clip.clip_pixels(batch.float_images())).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        txt = F.normalize(txt, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ txt.T
        loss = F.cross_entropy(logits, cap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss.detach())

    state = train_loop("clip-tune", args, work, args.clip_tune_steps, {"clip": model}, opt,
                       step_fn, args.clip_tune_lr)
    model.eval()
    model.save_pretrained(str(final), safe_serialization=True)
    tokenizer.save_pretrained(str(final))
    joint_info = json.loads((joint / "train_info.json").read_text())
    write_info(final, state, parameters=joint_info["parameters"], batch=args.clip_batch,
               joint_steps=joint_info["step"], joint_seconds=joint_info["seconds"],
               tune_steps=state["step"], tune_seconds=state["seconds"],
               total_seconds=joint_info["seconds"] + state["seconds"])
    log(f"[clip] saved {final} after {fmt_time(joint_info['seconds'] + state['seconds'])}")
