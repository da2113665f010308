"""Train the embedded `mini-sd` model on the procedural shape world, offline, on CPU.

Stages (each resumable, each deterministic from --seed):
  clip      mini-CLIP: image + text towers, contrastive (soft targets for repeated captions);
            its text tower conditions the UNet and is the pipeline's text encoder
  vae       mini-VAE: AutoencoderKL 32x32x3 -> 8x8x4, MSE + tiny KL; its scaling factor is
            1 / std of the latents it produces
  unet      mini-UNet: UNet2DConditionModel on VAE latents, text from the frozen mini-CLIP text
            tower, 10% empty captions (classifier-free guidance), SD's DDPM betas, epsilon
            objective, EMA weights
  clip-tune the scoring mini-CLIP: phase 1 fine-tuned against all training captions (hard
            negatives); it scores images (CLIP score, Frechet features, zero-shot concepts)
  assemble  the StableDiffusionPipeline folder (harness/assets/mini-sd) and the whole CLIPModel
            for scoring (harness/assets/mini-clip), safetensors only
  all       the four in order; a stage whose result exists is skipped (--force redoes it)

Checkpoints (safetensors + a JSON state) go to --work every few minutes, so a killed run
resumes where it stopped when started again with the same arguments.

    python -m harness.train_mini --stage all --threads 2 > train_mini.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO / ".mini-work"
STAGES = ("clip", "vae", "unet", "clip-tune", "assemble")
DEFAULTS = dict(clip_steps=800, clip_batch=256, clip_lr=1e-3,
                clip_tune_steps=2500, clip_tune_lr=1e-3,
                vae_steps=2200, vae_batch=64, vae_lr=1e-3,
                unet_steps=7500, unet_batch=128, unet_lr=5e-4,
                pool=160_000, ema=0.999, cfg_drop=0.1, kl_weight=1e-6)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints and stage results")
    p.add_argument("--out", default=None, help="assets folder (default: harness/assets)")
    p.add_argument("--force", action="store_true", help="redo stages whose result exists")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=50)
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `train-mini` sub-command; its handler is `run(args)`."""
    p = subparsers.add_parser("train-mini", help="train the embedded mini-sd model (CPU, ~1 h)",
                              description=__doc__.splitlines()[0])
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
    stages = STAGES if args.stage == "all" else (args.stage,)
    log(f"train-mini: stages {', '.join(stages)}, seed {args.seed}, "
        f"{torch.get_num_threads()} threads, work {work}")
    for stage in stages:
        STAGE_FUNCS[stage](args, work)
    return 0


# --- utilities ------------------------------------------------------------------------------
def log(message: str) -> None:
    print(time.strftime("%H:%M:%S ") + message, flush=True)


def stage_seed(seed: int, stage: str, step: int) -> int:
    """A distinct deterministic seed per (run seed, stage, step)."""
    offset = {"clip": 0, "vae": 1, "unet": 2, "assemble": 3, "clip-tune": 4}[stage]
    return (seed * 1_000_003 + offset * 100_000_007 + step) % (2**62)


def lr_at(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def optimizer_tensors(opt: Any) -> dict[str, Any]:
    """AdamW state as flat named tensors (safetensors holds no nested objects)."""
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"opt.{index}.{name}"] = value.detach().clone().contiguous()
    return out


def load_optimizer_tensors(opt: Any, tensors: dict[str, Any]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


class Checkpoint:
    """`<work>/<stage>/ckpt.safetensors` (models, EMA, optimizer) + `state.json` (step, time)."""

    def __init__(self, work: Path, stage: str, every_minutes: float):
        self.dir = work / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every = every_minutes * 60
        self.last = time.monotonic()

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def load(self) -> tuple[dict, dict[str, Any]] | None:
        from safetensors.torch import load_file

        state_path, tensor_path = self.dir / "state.json", self.dir / "ckpt.safetensors"
        if not (state_path.is_file() and tensor_path.is_file()):
            return None
        return json.loads(state_path.read_text()), load_file(str(tensor_path))

    def save(self, state: dict, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tmp = self.dir / "ckpt.tmp.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / "ckpt.safetensors")
        (self.dir / "state.tmp.json").write_text(json.dumps(state, indent=1))
        os.replace(self.dir / "state.tmp.json", self.dir / "state.json")
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every


def prefixed(prefix: str, module: Any) -> dict[str, Any]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def unprefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def train_loop(stage: str, args: argparse.Namespace, work: Path, total: int,
               modules: dict[str, Any], opt: Any, step_fn: Any, peak_lr: float,
               after_step: Any = None) -> dict:
    """The shared loop: resume, lr schedule, progress lines, periodic checkpoints."""
    ckpt = Checkpoint(work, stage, args.checkpoint_minutes)
    state = {"stage": stage, "step": 0, "seconds": 0.0, "seed": args.seed, "total": total}
    loaded = ckpt.load()
    if loaded is not None:
        saved, tensors = loaded
        if saved.get("seed") != args.seed:
            raise SystemExit(f"{ckpt.dir} holds a checkpoint of seed {saved.get('seed')}, "
                             f"not {args.seed}; remove it or pass --work elsewhere")
        for name, module in modules.items():
            module.load_state_dict(unprefixed(name, tensors))
        load_optimizer_tensors(opt, tensors)
        state.update(saved, total=total)
        log(f"[{stage}] resumed at step {state['step']} ({_fmt_time(state['seconds'])} so far)")

    def save() -> None:
        tensors = {}
        for name, module in modules.items():
            tensors.update(prefixed(name, module))
        tensors.update(optimizer_tensors(opt))
        ckpt.save(state, tensors)

    start, start_step, smooth = time.monotonic(), state["step"], None
    while state["step"] < total:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, peak_lr)
        t0 = time.monotonic()
        loss = step_fn(step)
        if after_step is not None:
            after_step(step)
        state["seconds"] += time.monotonic() - t0
        state["step"] = step + 1
        smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
        if state["step"] % args.log_every == 0 or state["step"] == total:
            rate = (state["step"] - start_step) / max(1e-9, time.monotonic() - start)
            eta = (total - state["step"]) / max(rate, 1e-9)
            log(f"[{stage}] step {state['step']}/{total} loss {loss:.4f} (avg {smooth:.4f}) "
                f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} steps/s ETA {_fmt_time(eta)}")
        if ckpt.due():
            save()
    save()
    state["loss_avg"] = smooth
    return state


def write_info(path: Path, state: dict, **extra: Any) -> None:
    info = {k: state[k] for k in ("stage", "step", "seconds", "seed") if k in state}
    info.update(extra)
    (path / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")


# --- stage: clip ----------------------------------------------------------------------------
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

    from harness import mini_sd, world

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
            cache["ids"] = mini_sd.tokenize(tokenizer, captions)
        cap = torch.tensor([cache["index"][c] for c in batch.captions])
        img = model.visual_projection(
            model.vision_model(pixel_values=mini_sd.clip_pixels(batch.float_images())).pooler_output)
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
    log(f"[clip] saved {joint} after {_fmt_time(state['seconds'])}")


def clip_tune(args: argparse.Namespace, work: Path, joint: Path, final: Path) -> None:
    """Phase 2: both towers learn to pick an image's caption among all 504 training captions
    (hard negatives: captions that differ in the shape alone), which in-batch negatives of
    phase 1 rarely give; the text tower of the result is the pipeline's text encoder."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPTokenizer

    from harness import mini_sd, world

    model = CLIPModel.from_pretrained(str(joint))
    tokenizer = CLIPTokenizer.from_pretrained(str(joint))
    model.train()
    captions = world.all_captions("train")  # held-out captions stay unseen, as in phase 1
    index = {c: i for i, c in enumerate(captions)}
    ids = mini_sd.tokenize(tokenizer, captions)
    trainable = list(model.parameters())
    log(f"[clip-tune] both towers against all {len(captions)} captions, "
        f"{args.clip_tune_steps} steps of {args.clip_batch}")
    opt = torch.optim.AdamW(trainable, lr=args.clip_tune_lr, weight_decay=0.05)

    def step_fn(step: int) -> float:
        batch = world.sample(args.clip_batch, stage_seed(args.seed, "clip-tune", step), "train")
        cap = torch.tensor([index[c] for c in batch.captions])
        img = model.visual_projection(
            model.vision_model(pixel_values=mini_sd.clip_pixels(batch.float_images())).pooler_output)
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
    log(f"[clip] saved {final} after {_fmt_time(joint_info['seconds'] + state['seconds'])}")


# --- stage: vae -----------------------------------------------------------------------------
def stage_vae(args: argparse.Namespace, work: Path) -> None:
    import torch

    from harness import mini_sd, world

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
    log(f"[vae] saved {final} after {_fmt_time(state['seconds'])}; scaling factor {scaling:.5f}")


# --- stage: unet ----------------------------------------------------------------------------
def _frozen_parts(work: Path) -> tuple[Any, Any, Any]:
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

    from harness import world

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
            f"({_fmt_time(time.monotonic() - t0)})")
    pool = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
            "caption": torch.cat(caps)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pool, str(path))
    return pool


def stage_unet(args: argparse.Namespace, work: Path) -> None:
    import copy

    import torch

    from harness import mini_sd, world

    final = work / "unet" / "final"
    if (final / "config.json").is_file() and not args.force:
        log(f"[unet] done already: {final}")
        return
    clip, tokenizer, vae = _frozen_parts(work)
    scaling = vae.config.scaling_factor
    captions = world.all_captions("all") + [""]  # the last one: the unconditional caption
    with torch.no_grad():
        ids = mini_sd.tokenize(tokenizer, captions)
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
    params, ema_params = list(unet.parameters()), list(ema.parameters())

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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    def ema_update(step: int) -> None:
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)

    state = train_loop("unet", args, work, args.unet_steps, {"unet": unet, "ema": ema}, opt,
                       step_fn, args.unet_lr, after_step=ema_update)
    ema.save_pretrained(str(final), safe_serialization=True)
    write_info(final, state, parameters=n_params, batch=args.unet_batch, ema=args.ema,
               cfg_drop=args.cfg_drop, pool=args.pool)
    log(f"[unet] saved EMA weights {final} after {_fmt_time(state['seconds'])}")


# --- stage: assemble ------------------------------------------------------------------------
def stage_assemble(args: argparse.Namespace, work: Path) -> None:
    import shutil

    from diffusers import UNet2DConditionModel

    from harness import mini_sd

    out = Path(args.out) if args.out else mini_sd.ASSETS
    clip, tokenizer, vae = _frozen_parts(work)
    unet_dir = work / "unet" / "final"
    if not (unet_dir / "config.json").is_file():
        raise SystemExit(f"assemble needs the unet stage first ({unet_dir} is missing)")
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir)).eval()
    pipe = mini_sd.assemble_pipeline(tokenizer, clip, vae, unet)
    pipe_dir, clip_dir = out / mini_sd.PIPELINE_DIR.name, out / mini_sd.CLIP_DIR.name
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
    info["command"] = "python -m harness.train_mini " + " ".join(sys.argv[1:])
    (pipe_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    total = sum(f.stat().st_size for d in (pipe_dir, clip_dir) for f in d.rglob("*") if f.is_file())
    log(f"[assemble] wrote {pipe_dir} and {clip_dir} ({total / 2**20:.1f} MiB together)")


STAGE_FUNCS = {"clip": stage_clip, "vae": stage_vae, "unet": stage_unet,
               "clip-tune": stage_clip_tune, "assemble": stage_assemble}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.train_mini",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
