"""Frechet distance: pure math, float64 running moments, reference-statistics cache, and the
"fid" (Inception-v3) and "fd_clip" (embedded mini-CLIP image features) metrics.

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), as pytorch-fid / clean-fid compute
it (scipy sqrtm, eps offset when the product is singular, imaginary residue dropped).
Covariances are unbiased (n - 1), from float64 sums, so shards merge exactly.
The two extractors write different columns (`fid` vs `fd_clip`): their numbers never mix.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.cache import cache_root
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

MIN_N = 5000  # below this, FD is biased high and not comparable across n
FD_BOOT = 100  # bootstrap resamples for FD: each costs O(n * d * min(n, d)) on the CPU
REFERENCE_ENV = "DIFFBENCH_FID_REF"
WORLD_REFERENCE_N = 1000
WORLD_REFERENCE_SEED = 1_000_003  # a seed the training data does not start from
WORLD_DATASET = f"world-all-seed{WORLD_REFERENCE_SEED}"


# --- pure math -------------------------------------------------------------------------------
def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                    np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2,
                                                                                    np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    try:
        from scipy import linalg
    except ImportError:  # pragma: no cover - scipy is a dependency
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues set to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum of sqrt(eig(R S1 R)), R = S2^(1/2) (S1 S2 ~ R S1 R, PSD)."""
    r = psd_sqrt(np.asarray(sigma2, np.float64))
    w = np.linalg.eigvalsh(r @ np.asarray(sigma1, np.float64) @ r)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def mean_cov(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of N x D features."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


_ROOTS: dict[str, np.ndarray] = {}


class Reference:
    """Reference statistics; FD of feature sets against them, fast enough to bootstrap.

    With R = sigma^(1/2) precomputed and Y = (F - mean F) R, tr((S_F sigma)^(1/2)) is the sum
    of sqrt(eigenvalues) of Y^T Y / (n - 1), or of the n x n Gram matrix Y Y^T / (n - 1) when
    n < D (same nonzero eigenvalues): one small eigen-decomposition per bootstrap resample.
    """

    def __init__(self, mu: Any, sigma: Any, name: str = "", root: Any = None) -> None:
        self.mu = np.asarray(mu, np.float64)
        self.sigma = np.asarray(sigma, np.float64)
        self.name = name
        self._root = None if root is None else np.asarray(root, np.float64)

    @property
    def root(self) -> np.ndarray:
        """sigma^(1/2), memoised per process by content (a 2048-d eigh is costly)."""
        if self._root is None:
            key = hashlib.sha256(self.sigma.tobytes()).hexdigest()
            if key not in _ROOTS:
                _ROOTS[key] = psd_sqrt(self.sigma)
            self._root = _ROOTS[key]
        return self._root

    def distance_stats(self, mu: Any, sigma: Any) -> float:
        """FD of N(mu, sigma) to the reference, via eigvalsh(R sigma R) (no scipy sqrtm)."""
        diff = np.asarray(mu, np.float64) - self.mu
        w = np.linalg.eigvalsh(self.root @ np.asarray(sigma, np.float64) @ self.root)
        return float(diff @ diff + np.trace(sigma) + np.trace(self.sigma)
                     - 2 * np.sqrt(np.clip(w, 0, None)).sum())

    def projected(self, features: Any) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.root

    def distance_projected(self, features: np.ndarray, proj: np.ndarray) -> float:
        """FD of `features` (N x D), given proj = features @ root."""
        n = len(features)
        mu = features.mean(0)
        diff = mu - self.mu
        centred = features - mu
        y = proj - proj.mean(0)
        gram = (y @ y.T) if n < y.shape[1] else (y.T @ y)
        w = np.linalg.eigvalsh(gram / (n - 1))
        tr_s = float((centred * centred).sum() / (n - 1))
        return float(diff @ diff + tr_s + np.trace(self.sigma)
                     - 2 * np.sqrt(np.clip(w, 0, None)).sum())

    def distance(self, features: Any) -> float:
        f = np.asarray(features, np.float64)
        return self.distance_projected(f, self.projected(f))

    def bootstrap(self, features: Any, n_boot: int = FD_BOOT, seed: int = 0) -> tuple:
        """Bias-corrected percentile interval of FD over resamples of the generated images
        (the reference statistics are held fixed)."""
        f = np.asarray(features, np.float64)
        if len(f) < 2:
            return None, None
        proj = self.projected(f)
        both = np.concatenate([f, proj], axis=1)
        d = f.shape[1]
        return bootstrap_ci(both, lambda x: self.distance_projected(x[:, :d], x[:, d:]),
                            n_boot=n_boot, seed=seed, bias_correct=True)


# --- running moments -------------------------------------------------------------------------
class RunningMoments:
    """n, float64 sum and sum of outer products of feature rows; `merge` is exact (sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: Any) -> None:
        f = np.asarray(features, np.float64)
        if f.size == 0:
            return
        s, o = f.sum(0), f.T @ f
        self.n += len(f)
        self.sum = s if self.sum is None else self.sum + s
        self.outer = o if self.outer is None else self.outer + o

    def merge(self, other: RunningMoments) -> None:
        if other.sum is None:
            return
        self.n += other.n
        self.sum = other.sum.copy() if self.sum is None else self.sum + other.sum
        self.outer = other.outer.copy() if self.outer is None else self.outer + other.outer

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, have {self.n}")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


# --- reference statistics cache --------------------------------------------------------------
def cache_dir() -> Path:
    return cache_root() / "stats"


def stats_key(dataset: str, extractor: str, resize: str, n: int) -> str:
    """File name of cached statistics, readable and unique for (dataset, extractor, resize, n)."""
    raw = f"{dataset}|{extractor}|{resize}|{n}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset}_{extractor}_{resize}_n{n}")[:120]
    return f"{slug}_{hashlib.sha256(raw.encode()).hexdigest()[:10]}.npz"


def save_stats(path: str | Path, mu: Any, sigma: Any, root: Any = None, **meta: Any) -> Path:
    """Write mu / sigma (float64; sigma^(1/2) as `root` when given) and string metadata
    atomically, MLPerf / clean-fid style."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if root is not None:
        arrays["root"] = np.asarray(root, np.float64)
    arrays.update({k: np.asarray(str(v)) for k, v in meta.items()})
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_stats(path: str | Path) -> Reference:
    """User-given or cached statistics: an .npz with `mu` and `sigma` (e.g. MLPerf val2014)."""
    path = Path(os.path.expanduser(str(path)))
    try:
        with np.load(path, allow_pickle=False) as data:
            root = data["root"] if "root" in data.files else None
            return Reference(data["mu"], data["sigma"], name=path.name, root=root)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DiffbenchError(f"reference statistics {path}: cannot read mu / sigma ({exc})") \
            from None


def cached_reference(dataset: str, extractor: str, resize: str, n: int,
                     features: Callable[[], np.ndarray], directory: Path | None = None
                     ) -> Reference:
    """Statistics from the cache, or computed from `features()` and cached."""
    path = (directory or cache_dir()) / stats_key(dataset, extractor, resize, n)
    ref = None
    if path.exists():
        try:
            ref = load_stats(path)
        except DiffbenchError as exc:  # a damaged cache file is rebuilt, never trusted
            print(f"diffbench: rebuilding damaged cached statistics ({exc})", file=sys.stderr)
    if ref is None:
        ref = Reference(*mean_cov(features()))
        save_stats(path, ref.mu, ref.sigma, root=ref.root, dataset=dataset,
                   extractor=extractor, resize=resize, n=n)
    ref.name = f"{dataset}:n{n}"
    return ref


def world_reference_images(n: int = WORLD_REFERENCE_N, seed: int = WORLD_REFERENCE_SEED,
                           split: str = "all") -> np.ndarray:
    """Real images of the embedded procedural world (harness.mini.world.sample, every combination
    including the held-out ones: the world as it is), uint8 N x 32 x 32 x 3."""
    from harness.mini import world

    return images_as_numpy(world.sample(n, seed, split=split).images)


# --- metrics ---------------------------------------------------------------------------------
class FrechetMetric(Metric):
    """Features of every generated image -> FD against reference statistics, with its CI.

    States: `moment_n` / `moment_sum` / `moment_outer` (float64 running sums, merged by
    addition) and `features` (rows kept for the bootstrap, merged by concatenation).
    """

    higher_is_better = False
    column = "fd"

    def __init__(self, extractor: Callable[[np.ndarray], np.ndarray] | None = None,
                 reference: Reference | None = None, extractor_name: str = "",
                 resize: str = "", note: str = "", n_boot: int = FD_BOOT) -> None:
        super().__init__()
        self.extractor, self.reference = extractor, reference
        self.extractor_name, self.resize, self.note = extractor_name, resize, note
        self.n_boot = n_boot
        self.skipped = False
        self.add_state("features", [], reduce="cat")
        self.add_state("moment_n", 0, reduce="sum")
        self.add_state("moment_sum", None, reduce="sum")
        self.add_state("moment_outer", None, reduce="sum")

    @property
    def moments(self) -> RunningMoments:
        """The running moments held in the declared states."""
        m = RunningMoments()
        m.n, m.sum, m.outer = self.moment_n, self.moment_sum, self.moment_outer
        return m

    @classmethod
    def skip(cls) -> FrechetMetric:
        m = cls()
        m.skipped = True
        return m

    def update(self, obs: Observation) -> None:
        if obs.images is None or self.skipped or self.extractor is None:
            return
        feats = np.asarray(self.extractor(images_as_numpy(obs.images)), np.float64)
        m = self.moments
        m.update(feats)
        self.moment_n, self.moment_sum, self.moment_outer = m.n, m.sum, m.outer
        self.features.extend(feats.astype(np.float32))

    def compute(self) -> dict[str, Any]:
        c = self.column
        if self.skipped:
            return {}
        out: dict[str, Any] = {c: None, f"{c}_ci_lo": None, f"{c}_ci_hi": None,
                               f"{c}_warning": "", f"{c}_extractor": self.extractor_name,
                               f"{c}_resize": self.resize,
                               f"{c}_reference": self.reference.name if self.reference else "",
                               f"{c}_note": self.note}
        if self.extractor is None or self.reference is None or self.moments.n < 2:
            if not self.note and self.moments.n < 2 and self.extractor is not None:
                out[f"{c}_note"] = "fewer than 2 images"
            return out
        feats = np.asarray(self.features, np.float64)
        if len(feats) == self.moments.n and len(feats) < feats.shape[1]:
            out[c] = self.reference.distance(feats)  # n < d: the n x n Gram path, same value
        else:
            out[c] = self.reference.distance_stats(*self.moments.mean_cov())
        out[f"{c}_ci_lo"], out[f"{c}_ci_hi"] = self.reference.bootstrap(feats, self.n_boot)
        out[f"{c}_warning"] = warning_text(self.moments.n, MIN_N,
                                           "Frechet distance biased high, compare only at equal n")
        return out


@register_metric("fid")
class FID(FrechetMetric):
    """FID: the TF 2015-12-05 Inception-v3 pool features (pytorch-fid weight file).

    Options (`[metric_options.fid]`): `weights` (file), `reference` (.npz with mu / sigma, else
    $DIFFBENCH_FID_REF; for the embedded model the world images are the default reference),
    `resize` ("clean" default, or "legacy_pytorch").
    """

    column = "fid"
    option_names = ("reference", "resize", "weights")

    @classmethod
    def for_cell(cls, context: MetricContext) -> FID:
        from metrics import inception

        if quality_skip_reason(context):
            return cls.skip()
        opts = metric_options(context, "fid")
        resize = str(opts.get("resize", "clean"))
        weights = opts.get("weights") or inception.find_weights()
        if weights is None or not Path(weights).is_file():
            return cls(resize=resize, extractor_name=inception.EXTRACTOR,
                       note=inception.not_found_note())
        net, sha = inception.load_inception(weights)
        device = getattr(context.cell, "device", "cpu")
        ext = inception.InceptionExtractor(net, resize=resize, sha256=sha, device=device)
        ref_path = opts.get("reference") or os.environ.get(REFERENCE_ENV)
        note = ""
        if ref_path:
            reference = load_stats(ref_path)
        elif is_embedded(context):
            reference = cached_reference(WORLD_DATASET, ext.name, resize, WORLD_REFERENCE_N,
                                         lambda: ext(world_reference_images()))
        else:
            reference = None
            note = (f"no reference statistics: give [metric_options.fid] reference = 'stats.npz' "
                    f"(mu, sigma) or ${REFERENCE_ENV}")
        return cls(ext, reference, extractor_name=ext.name, resize=resize, note=note)


@register_metric("fd_clip")
class FDClip(FrechetMetric):
    """Frechet distance on the embedded mini-CLIP's image embeddings (L2-normalised), against
    real images of the procedural world; only for the embedded model (mini-sd).

    Options (`[metric_options.fd_clip]`): `clip_model` (as for clip_score; mini-CLIP default).
    """

    column = "fd_clip"
    option_names = ("clip_model",)

    @classmethod
    def for_cell(cls, context: MetricContext) -> FDClip:
        from metrics.clip_score import try_backend

        if quality_skip_reason(context) or not is_embedded(context):
            return cls.skip()
        backend, note = try_backend(context, "fd_clip")
        if backend is None:
            return cls(extractor_name="mini-clip", note=note)
        return cls.with_backend(backend)

    @classmethod
    def with_backend(cls, backend: Any, reference_images: Callable[[], np.ndarray] | None = None,
                     directory: Path | None = None, n: int = WORLD_REFERENCE_N) -> FDClip:
        extract = backend.image_features
        try:
            images = reference_images or (lambda: world_reference_images(n))
            reference = cached_reference(WORLD_DATASET, backend.name, "none", n,
                                         lambda: extract(images()), directory)
            note = ""
        except (ImportError, AttributeError) as exc:
            reference, note = None, f"no world reference images: {exc}"
        return cls(extract, reference, extractor_name=backend.name, resize="none", note=note)
