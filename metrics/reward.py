"""Reward / preference models: learned human-preference scores of an image for its prompt.

- `pickscore` (Kirstain et al., arXiv 2305.01569): a CLIP-H fine-tuned on Pick-a-Pic
  preferences; per (image, its prompt) the score is logit_scale.exp() * cos(image_emb,
  text_emb), the projected embeddings of transformers' CLIPModel, as the PickScore README
  computes it (its processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K, images resized to 224 on
  the short side and centre-cropped, prompts truncated to 77 tokens). The README's softmax over
  the images of one prompt compares candidates; a benchmark row reports the mean raw score.
- `image_reward` (ImageReward, Xu et al., arXiv 2304.05977) and `hps` (HPS v2.1, Wu et al.,
  arXiv 2306.09341) are scored by their own packages (`image-reward`, `hpsv2`). Neither
  imports beside torch 2.13.0+cpu: both import torchvision at import time (ImageReward 1.5 also
  OpenAI's `clip` and timm, hpsv2 1.2.0 its bundled open_clip and `clint`), and the only
  torchvision for torch 2.13 (0.28.0) links libtorch_cuda / libc10_cuda, which the CPU wheel
  lacks. The metrics are registered so suites can name them; they report no value and a
  one-line note with the import failure and where the weights were looked for, never a score
  from a stand-in model.

Weights are never downloaded here: `model` / `processor` is a local folder or a hub id already
in the HF cache (from_pretrained with local_files_only, HF_HUB_OFFLINE semantics); a missing
one leaves the column None with a one-line note naming the option and the places looked.
Per-image scores are a "cat" state; the columns are the mean, a percentile bootstrap interval
over the images, a small-sample warning, the model's name and the note.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from harness.errors import DiffbenchError
from harness.metric import Metric, MetricContext, Observation, register_metric
from metrics.bootstrap import ci_columns, images_as_numpy, metric_options, quality_skip_reason
from metrics.clip_score import ClipBackend, clip_cosines

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MIN_N = 100  # our choice, as clip_score's: fewer images give a wide interval of the mean

Scorer = Callable[[np.ndarray, Sequence[str]], Sequence[float]]  # images, prompts -> scores


# --- finding weights offline -------------------------------------------------------------------
def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_hub_id(name: str) -> bool:
    """`name` could be a hub repo id ("org/name" or "name"), not only a path."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def places(name: str, filename: str = "") -> str:
    """Where a model named `name` was looked for, as a phrase."""
    folder = Path(os.path.expanduser(name)).absolute()
    where = f"{folder / filename if filename else folder}"
    if is_hub_id(name):
        where += f" and the HF cache {hub_cache() / ('models--' + name.replace('/', '--'))}"
    return where


def missing_line(metric: str, option: str, name: str, filename: str = "") -> str:
    """One line: the option, the name, the places looked, what to do."""
    fetch = f" or download it first (hf download {name})" if is_hub_id(name) else ""
    return (f"{metric} not measured: [metric_options.{metric}] {option} = '{name}' not found "
            f"(looked in {places(name, filename)}; offline, nothing is downloaded): give a "
            f"local folder{fetch}")


def from_pretrained(cls: Any, name: str, metric: str, option: str) -> Any:
    """`cls.from_pretrained(name)` from a local folder or the HF cache only, or a one-line
    DiffbenchError naming `[metric_options.<metric>] <option>` and where it looked."""
    path = Path(os.path.expanduser(name))
    try:
        return cls.from_pretrained(str(path) if path.exists() else name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if not path.exists():
            raise DiffbenchError(missing_line(metric, option, name)) from None
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise DiffbenchError(f"{metric} not measured: [metric_options.{metric}] {option} = "
                             f"'{name}': cannot load {cls.__name__} from {path.absolute()} "
                             f"({first})") from None


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_name(name: str, model: Any) -> str:
    """`name@<hub commit>` from the HF cache, `name@<sha256 of the weight files>` for a local
    folder (memoised per file size and time), so cached features follow the weights."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit:
        return f"{name}@{commit[:12]}"
    folder = Path(os.path.expanduser(name))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return name
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        key = (str(f.absolute()), stat.st_size, stat.st_mtime_ns)
        if key not in _HASHES:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
            _HASHES[key] = h.hexdigest()
        digest.update(_HASHES[key].encode())
    return f"{name}@{digest.hexdigest()[:12]}"


def image_processor_class() -> Any:
    """transformers' PIL CLIP image processor (the reference behaviour; the default class wants
    torchvision in transformers 5 and falls back to this one with a warning)."""
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers 4: the default class is the PIL one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    return CLIPImageProcessorPil


def import_failure(module: str) -> str:
    """"" when `module` imports, else why not, in one line."""
    try:
        if importlib.util.find_spec(module) is None:
            return f"ModuleNotFoundError: No module named '{module}'"
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (a broken package raises anything on import)
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    return ""


# --- PickScore -------------------------------------------------------------------------------
def pickscore_of(image_emb: torch.Tensor, text_emb: torch.Tensor,
                 logit_scale: float) -> torch.Tensor:
    """Per matching row logit_scale.exp() * cos(image, text), float64 (`logit_scale` is the
    model's parameter, before exp)."""
    return float(np.exp(logit_scale)) * clip_cosines(image_emb, text_emb) / 100.0


@dataclasses.dataclass
class PickScorer:
    """A CLIP (PickScore's architecture) with its processor: scores of images for prompts."""

    backend: ClipBackend
    logit_scale: float  # the model's logit_scale parameter (before exp)

    @property
    def name(self) -> str:
        return self.backend.name

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> list[float]:
        scores = pickscore_of(self.backend.image_embeds(images),
                              self.backend.text_embeds(list(prompts)), self.logit_scale)
        return [float(s) for s in scores]


def load_pickscore(model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR,
                   device: str = "cpu", metric: str = "pickscore") -> PickScorer:
    """PickScore's CLIPModel and its processor's tokenizer and image processor, offline."""
    from transformers import CLIPModel, CLIPTokenizer

    net = from_pretrained(CLIPModel, model, metric, "model").eval().to(device)
    tokenizer = from_pretrained(CLIPTokenizer, processor, metric, "processor")
    images = from_pretrained(image_processor_class(), processor, metric, "processor")

    def pixel_values(batch: np.ndarray) -> torch.Tensor:
        return images(images=list(batch), return_tensors="pt")["pixel_values"]

    backend = ClipBackend(weights_name(model, net), net, tokenizer, pixel_values, device)
    return PickScorer(backend, float(net.logit_scale.detach().float().cpu()))


_SCORERS: dict[tuple[str, str, str], PickScorer] = {}


def cached_pickscore(model: str, processor: str, device: str) -> PickScorer:
    """One loaded PickScore per (model, processor, device) per process (for_cell runs per
    shard and on the merging side)."""
    key = (model, processor, device)
    if key not in _SCORERS:
        _SCORERS[key] = load_pickscore(model, processor, device)
    return _SCORERS[key]


# --- metrics ---------------------------------------------------------------------------------
class RewardMetric(Metric):
    """Per-image reward scores of images for their prompts (state `scores`, merged by
    concatenation) -> mean, bootstrap CI, warning, model name, note."""

    higher_is_better = True
    column: ClassVar[str] = "reward"

    def __init__(self, scorer: Scorer | None = None, model_name: str = "", note: str = "",
                 skipped: bool = False) -> None:
        super().__init__()
        self.scorer, self.note, self.skipped = scorer, note, skipped
        self.model_name = model_name or getattr(scorer, "name", "")
        self.add_state("scores", [], reduce="cat")

    def update(self, obs: Observation) -> None:
        if self.scorer is None or self.skipped or obs.images is None or not obs.prompts:
            return
        images = images_as_numpy(obs.images)
        if len(images) != len(obs.prompts):
            raise ValueError(f"{len(images)} images but {len(obs.prompts)} prompts")
        self.scores.extend(float(s) for s in self.scorer(images, list(obs.prompts)))

    def compute(self) -> dict[str, Any]:
        c = self.column
        if self.skipped:
            return {}
        out = ci_columns(c, self.scores, MIN_N, "wide interval")
        out.update({f"{c}_model": self.model_name, f"{c}_note": self.note})
        return out


@register_metric("pickscore")
class PickScore(RewardMetric):
    """Mean PickScore of images for their prompts, bootstrap CI.

    Options (`[metric_options.pickscore]`): `model` (a local folder or a cached hub id of a
    transformers CLIPModel; yuvalkirstain/PickScore_v1 default), `processor` (its tokenizer and
    image processor; laion/CLIP-ViT-H-14-laion2B-s32B-b79K default).
    """

    column = "pickscore"
    option_names = ("model", "processor")

    @classmethod
    def for_cell(cls, context: MetricContext) -> PickScore:
        if quality_skip_reason(context):
            return cls(skipped=True)
        opts = metric_options(context, "pickscore")
        model = str(opts.get("model") or PICKSCORE_MODEL)
        processor = str(opts.get("processor") or PICKSCORE_PROCESSOR)
        try:
            scorer = cached_pickscore(model, processor, getattr(context.cell, "device", "cpu"))
        except DiffbenchError as exc:
            return cls(model_name=model, note=str(exc))
        return cls(scorer)


class PackageReward(RewardMetric):
    """A reward model scored by its own package. diffbench does not score through these
    packages (they could not be imported where this was written), so `for_cell` always leaves
    a note: why the package does not import (or that it does) and where the weights were
    looked for. An injected `scorer` exercises the state machinery in tests only."""

    option_names = ("model",)
    package: ClassVar[str] = ""  # the PyPI name
    module: ClassVar[str] = ""  # what it is imported as
    needs: ClassVar[str] = ""  # what the package imports that fails here
    default_model: ClassVar[str] = ""  # hub id of the weights
    weights_file: ClassVar[str] = ""  # the checkpoint file in that repo

    @classmethod
    def weights_status(cls, name: str) -> str:
        """Where the checkpoint is, or where it was looked for."""
        path = Path(os.path.expanduser(name))
        found = path if path.is_file() else path / cls.weights_file
        if not found.is_file() and is_hub_id(name):
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, cls.weights_file)
            found = Path(hit) if isinstance(hit, str) else found
        option = f"[metric_options.{cls.column}] model = '{name}'"
        if found.is_file():
            return f"{option}: weights at {found.absolute()}"
        where = places(name, cls.weights_file)
        return f"{option}: {cls.weights_file} not found (looked in {where})"

    @classmethod
    def package_note(cls, name: str) -> str:
        why = import_failure(cls.module)
        if why:
            state = (f"the package '{cls.package}' (import {cls.module}) does not import here "
                     f"({why}; {cls.needs})")
        else:
            state = (f"the package '{cls.package}' imports, but diffbench does not score "
                     f"through it yet (untested: it did not import where this was written)")
        return f"{cls.column} not measured: {state}; {cls.weights_status(name)}"

    @classmethod
    def for_cell(cls, context: MetricContext) -> PackageReward:
        if quality_skip_reason(context):
            return cls(skipped=True)
        name = str(metric_options(context, cls.column).get("model") or cls.default_model)
        return cls(model_name=name, note=cls.package_note(name))


@register_metric("image_reward")
class ImageRewardMetric(PackageReward):
    """ImageReward via the `image-reward` package, which does not import here: a note, no value.

    (ImageReward: a BLIP ViT-L image-text encoder with an MLP reward head.)

    Options (`[metric_options.image_reward]`): `model` (ImageReward.pt, its folder, or a cached
    hub id; THUDM/ImageReward default).
    """

    column = "image_reward"
    package, module = "image-reward", "ImageReward"
    needs = ("ImageReward 1.5 imports torchvision, timm 0.6.13 and OpenAI's clip; no "
             "torchvision here matches this torch")
    default_model, weights_file = "THUDM/ImageReward", "ImageReward.pt"


@register_metric("hps")
class HPSMetric(PackageReward):
    """HPS v2.1 via the `hpsv2` package, which does not import here: a note, no value.

    (HPS v2.1: an open_clip ViT-H-14 fine-tuned on the HPD v2 preferences.)

    Options (`[metric_options.hps]`): `model` (HPS_v2.1_compressed.pt, its folder, or a cached
    hub id; xswu/HPSv2 default).
    """

    column = "hps"
    package, module = "hpsv2", "hpsv2"
    needs = ("hpsv2 1.2.0 imports clint and, through its bundled open_clip, torchvision; no "
             "torchvision here matches this torch")
    default_model, weights_file = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
