"""Where the embedded models' weights live inside the package (safetensors, offline)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
PIPELINE_DIR = ASSETS / "mini-sd"  # the StableDiffusionPipeline folder
MMDIT_DIR = ASSETS / "mini-sd3"  # the StableDiffusion3Pipeline folder (the embedded MMDiT)
CLIP_DIR = ASSETS / "mini-clip"  # the whole CLIPModel for scoring
