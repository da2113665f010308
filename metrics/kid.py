"""Kernel Inception Distance (Binkowski et al., arXiv 1801.01401, Sec. 4 / App. D): the unbiased
MMD^2 between real and generated features with the cubic polynomial kernel
k(x, y) = (x . y / d + 1)^3, averaged over random subsets; "kid" on the pinned Inception's pool
features, "kd_clip" on the embedded mini-CLIP's image embeddings.

Unlike FD it is unbiased in the sample size, so small runs compare; the subsets' standard
deviation is reported (`<col>_std`) as torchmetrics' KernelInceptionDistance reports it, and a
bootstrap interval over the generated images, shifted by the bootstrap bias as FD's is (a
resample's duplicated images raise the within-set kernel mean). Subsets are drawn as
torchmetrics draws them (`randperm` of the real rows, then of the generated rows, per subset)
from a generator seeded with `seed`, so the value equals torchmetrics' under
`torch.manual_seed(seed)`. The real features (the world's images for the embedded model, or a
user's `reference` .npz with a `features` array) are cached like FD's statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import DiffbenchError
from harness.files import atomic_write
from harness.metric import Metric, MetricContext, Observation, register_metric
from metrics.bootstrap import (
    bootstrap_ci,
    images_as_numpy,
    is_embedded,
    metric_options,
    quality_skip_reason,
    warning_text,
)
from metrics.frechet import WORLD_DATASET, WORLD_REFERENCE_N, cache_dir, stats_key
from metrics.frechet import world_reference_images as world_images

SUBSETS, SUBSET_SIZE = 100, 1000  # the paper's and torchmetrics' defaults
MIN_N = SUBSET_SIZE  # below this the subsets are the whole (small) sets: a noisy estimate
BOOT, BOOT_SUBSETS = 100, 10  # bootstrap resamples, and subsets per resample


# --- pure math -------------------------------------------------------------------------------
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3,
                      gamma: float | None = None, coef: float = 1.0) -> torch.Tensor:
    """k(x, y) = (gamma x . y + coef)^degree, gamma = 1 / d by default (KID's kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of m-row samples X, Y from their kernel matrices (Gretton et al. 2012,
    Eq. 3): the within-sample means leave out the diagonal, the cross term does not."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum())
    return within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kid_scores(real: Any, fake: Any, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
               degree: int = 3, gamma: float | None = None, coef: float = 1.0,
               seed: int = 0) -> torch.Tensor:
    """MMD^2 of `subsets` random subsets of `subset_size` rows of each set (at most the smaller
    set's size), drawn as torchmetrics draws them from a generator seeded with `seed`."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows in each set, have {len(real)} and "
                         f"{len(fake)}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=gen)[:m]]
        y = fake[torch.randperm(len(fake), generator=gen)[:m]]
        k = lambda a, b: polynomial_kernel(a, b, degree, gamma, coef)  # noqa: E731
        out.append(mmd2_unbiased(k(x, x), k(x, y), k(y, y)))
    return torch.stack(out)


def kid(real: Any, fake: Any, **kw: Any) -> tuple[float, float]:
    """(mean, standard deviation) of the subsets' MMD^2, as torchmetrics reports them."""
    scores = kid_scores(real, fake, **kw)
    return float(scores.mean()), float(scores.std(unbiased=False))


# --- real features ---------------------------------------------------------------------------
def cached_features(dataset: str, extractor: str, n: int, compute: Callable[[], np.ndarray],
                    directory: Path | None = None) -> np.ndarray:
    """The real images' feature rows from the stats cache, or computed and cached."""
    path = (directory or cache_dir()) / stats_key(dataset, extractor, "features", n)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                return np.asarray(data["features"], np.float64)
        except (OSError, KeyError, ValueError, EOFError):
            pass  # damaged: rebuilt below
    feats = np.asarray(compute(), np.float64)
    atomic_write(path, lambda fh: np.savez(fh, features=feats))
    return feats


def load_features(path: str | Path) -> np.ndarray:
    """A user's reference: an .npz whose `features` array holds one row per real image."""
    path = Path(os.path.expanduser(str(path)))
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["features"], np.float64)
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise DiffbenchError(f"reference features {path}: cannot read a `features` array "
                             f"({exc})") from None


# --- metrics ---------------------------------------------------------------------------------
class KernelDistance(Metric):
    """Features of every generated image -> a kernel distance to real features, bootstrap CI.

    State: `features` (rows, merged by concatenation). Subclasses set `column` and
    `distance(real, fake, subsets, seed) -> (value, spread or None)`.
    """

    higher_is_better = False
    column = "kd"
    spread = True  # distance() also gives a spread over subsets: the `<column>_std` column

    def __init__(self, extractor: Callable[[np.ndarray], np.ndarray] | None = None,
                 real: np.ndarray | None = None, extractor_name: str = "",
                 reference: str = "", note: str = "", n_boot: int = BOOT,
                 skipped: bool = False) -> None:
        super().__init__()
        self.extractor, self.real = extractor, real
        self.extractor_name, self.reference, self.note = extractor_name, reference, note
        self.n_boot, self.skipped = n_boot, skipped
        self.add_state("features", [], reduce="cat")

    def distance(self, real: np.ndarray, fake: np.ndarray, subsets: int,
                 seed: int) -> tuple[float, float | None]:
        raise NotImplementedError

    def update(self, obs: Observation) -> None:
        if obs.images is None or self.skipped or self.extractor is None:
            return
        feats = np.asarray(self.extractor(images_as_numpy(obs.images)), np.float64)
        self.features.extend(feats)

    def compute(self) -> dict[str, Any]:
        c = self.column
        if self.skipped:
            return {}
        out: dict[str, Any] = {c: None, **({f"{c}_std": None} if self.spread else {}),
                               f"{c}_ci_lo": None, f"{c}_ci_hi": None, f"{c}_warning": "",
                               f"{c}_extractor": self.extractor_name,
                               f"{c}_reference": self.reference, f"{c}_note": self.note}
        fake = np.asarray(self.features, np.float64)
        if self.extractor is None or self.real is None or len(fake) < 2:
            if not self.note and self.extractor is not None and len(fake) < 2:
                out[f"{c}_note"] = "fewer than 2 images"
            return out
        out[c], spread = self.distance(self.real, fake, SUBSETS, 0)
        if self.spread:
            out[f"{c}_std"] = spread
        out[f"{c}_ci_lo"], out[f"{c}_ci_hi"] = bootstrap_ci(
            fake, lambda f: self.distance(self.real, f, BOOT_SUBSETS, 1)[0], n_boot=self.n_boot,
            bias_correct=True)  # duplicated images in a resample look alike: biased upward
        out[f"{c}_warning"] = warning_text(len(fake), MIN_N, "subsets smaller than the "
                                           "paper's 1000: a noisier estimate")
        return out


class KIDMetric(KernelDistance):
    def distance(self, real: np.ndarray, fake: np.ndarray, subsets: int,
                 seed: int) -> tuple[float, float | None]:
        return kid(real, fake, subsets=subsets, seed=seed)


@register_metric("kid")
class KID(KIDMetric):
    """KID on the pinned Inception-v3 pool features (the FID weight file).

    Options (`[metric_options.kid]`): `weights` (file), `reference` (.npz with a `features`
    array of real images' pool features; for the embedded model the world images are the
    default), `resize` ("clean" default, or "legacy_pytorch").
    """

    column = "kid"
    option_names = ("reference", "resize", "weights")

    @classmethod
    def for_cell(cls, context: MetricContext) -> KID:
        from metrics import inception

        if quality_skip_reason(context):
            return cls(skipped=True)
        opts = metric_options(context, "kid")
        resize = str(opts.get("resize", "clean"))
        weights = opts.get("weights") or inception.find_weights()
        if weights is None or not Path(weights).is_file():
            return cls(extractor_name=inception.EXTRACTOR, note=inception.not_found_note())
        net, sha = inception.load_inception(weights)
        ext = inception.InceptionExtractor(net, resize=resize, sha256=sha,
                                           device=getattr(context.cell, "device", "cpu"))
        if opts.get("reference"):
            return cls(ext, load_features(opts["reference"]), ext.name,
                       Path(str(opts["reference"])).name)
        if is_embedded(context):
            real = cached_features(WORLD_DATASET, f"{ext.name}-{resize}", WORLD_REFERENCE_N,
                                   lambda: ext(world_images()))
            return cls(ext, real, ext.name, f"{WORLD_DATASET}:n{WORLD_REFERENCE_N}")
        return cls(ext, None, ext.name, note="no reference features: give "
                   "[metric_options.kid] reference = 'features.npz' (a `features` array)")


@register_metric("kd_clip")
class KDClip(KIDMetric):
    """KID's estimator on the embedded mini-CLIP's image embeddings, against real images of the
    procedural world; only for the embedded model.

    Options (`[metric_options.kd_clip]`): `clip_model` (as for clip_score; mini-CLIP default).
    """

    column = "kd_clip"
    option_names = ("clip_model",)

    @classmethod
    def for_cell(cls, context: MetricContext) -> KernelDistance:
        return clip_world_metric(cls, context, "kd_clip")


def clip_world_metric(cls: type[KernelDistance], context: MetricContext,
                      name: str) -> KernelDistance:
    """`cls` on the cell's CLIP image embeddings against the world's real images (embedded
    models only; a missing CLIP model leaves a note)."""
    from metrics.clip_score import try_backend

    if quality_skip_reason(context) or not is_embedded(context):
        return cls(skipped=True)
    backend, note = try_backend(context, name)
    if backend is None:
        return cls(extractor_name="mini-clip", note=note)
    extract = backend.image_features
    real = cached_features(WORLD_DATASET, backend.name, WORLD_REFERENCE_N,
                           lambda: extract(world_images()))
    return cls(extract, real, backend.name, f"{WORLD_DATASET}:n{WORLD_REFERENCE_N}")
