"""The FID Inception-v3 network in pure torch (no torchvision), and its pinned preprocessing.

Architecture: Inception-v3 with the FID patches of the TF 2015-12-05 graph as pytorch-fid
builds it (FIDInceptionA / C / E_1 / E_2: average pools that ignore padding, a max pool in the
last block), with pytorch-fid's state-dict key names, so `pt_inception-2015-12-05-6726825d.pth`
loads with `torch.load(weights_only=True)` and `load_state_dict(strict=True)`. Output: the
2048-d final average pool.

Preprocessing (the "resize" recorded in the row):
- "clean" (default, clean-fid's mode): each channel of the uint8 image as float32, resized to
  299x299 by PIL bicubic (mode "F", no quantisation, no clipping), then (x - 128) / 128 as
  clean-fid feeds the network.
- "legacy_pytorch" (pytorch-fid's mode): x / 255, torch bilinear resize (align_corners=False),
  then 2x - 1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.cache import cache_root

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
WEIGHTS_ENV = "DIFFBENCH_INCEPTION"
FEATURES = 2048
SIZE = 299
RESIZES = ("clean", "legacy_pytorch")
EXTRACTOR = "inception-v3-tf-2015-12-05"


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU; keys `conv.*`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel_size: Any, stride: int = 1,
                 padding: Any = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 average pool: the padded zeros do not count."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """E_1 (`max_pool=False`: average pool ignoring padding) or E_2 (3x3 max pool, stride 1)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                else _avg_pool(x))
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 FID variant; `forward` takes preprocessed N x 3 x 299 x 299 (in [-1, 1])
    and returns N x 2048 pool features. `fc` (1008 classes) is kept only so the weight file
    loads strictly; it is not used."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --- preprocessing ---------------------------------------------------------------------------
def resize_clean(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """clean-fid "clean": per channel, float32 PIL bicubic to size x size; N x size x size x 3
    float32 on the 0..255 scale (not clipped, not quantised)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(img[:, :, c].astype(np.float32), mode="F")
            out[i, :, :, c] = np.asarray(channel.resize((size, size), Image.BICUBIC))
    return out


def preprocess(images: np.ndarray, resize: str = "clean", size: int = SIZE) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x size x size network input, pinned by `resize`."""
    if resize == "clean":
        x = torch.from_numpy(resize_clean(images, size)).permute(0, 3, 1, 2)
        return (x - 128.0) / 128.0
    if resize == "legacy_pytorch":
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0
    raise ValueError(f"unknown resize {resize!r}; use one of {RESIZES}")


class InceptionExtractor:
    """uint8 images -> float64 N x 2048 features, in batches; names itself for the row."""

    def __init__(self, net: FIDInceptionV3, resize: str = "clean", sha256: str = "",
                 batch_size: int = 32, device: str = "cpu") -> None:
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; use one of {RESIZES}")
        self.net = net.eval().to(device)
        self.resize, self.sha256 = resize, sha256
        self.batch_size, self.device = batch_size, device

    @property
    def name(self) -> str:
        return f"{EXTRACTOR}@{self.sha256[:12]}" if self.sha256 else f"{EXTRACTOR}@random"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        feats = []
        for start in range(0, len(images), self.batch_size):
            x = preprocess(images[start:start + self.batch_size], self.resize).to(self.device)
            feats.append(self.net(x).double().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, FEATURES))


# --- weights ---------------------------------------------------------------------------------
def candidate_paths() -> list[Path]:
    """Where the weight file is looked for, in order."""
    paths = []
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(os.path.expanduser(env))
        paths.append(p / WEIGHTS_FILE if p.is_dir() else p)
    paths += [cache_root() / WEIGHTS_FILE,
              Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE]
    return paths


def find_weights() -> Path | None:
    return next((p for p in candidate_paths() if p.is_file()), None)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_weights(target: Path | None = None) -> Path:  # pragma: no cover - network
    """Fetch pytorch-fid's weight file (only when the user opts in and is online)."""
    import urllib.request

    target = target or cache_root() / WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    urllib.request.urlretrieve(WEIGHTS_URL, tmp)
    if not sha256_of(tmp).startswith("6726825d"):
        # the pytorch-fid file name carries the first hex digits of its sha256
        tmp.unlink()
        raise RuntimeError(f"downloaded {WEIGHTS_FILE} does not match its hash prefix")
    os.replace(tmp, target)
    return target


def load_inception(path: str | Path | None = None) -> tuple[FIDInceptionV3, str]:
    """The network with the weight file loaded strictly, and the file's sha256."""
    path = Path(path) if path else find_weights()
    if path is None:
        raise FileNotFoundError(not_found_note())
    net = FIDInceptionV3()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval(), sha256_of(path)


def not_found_note(paths: Iterable[Path] | None = None) -> str:
    where = ", ".join(str(p) for p in (paths or candidate_paths()))
    return (f"Inception weights {WEIGHTS_FILE} not found (looked in {where}); "
            f"set {WEIGHTS_ENV} to the file")
