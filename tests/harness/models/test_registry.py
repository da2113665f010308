"""Pretrained loading path (from_pretrained on a local folder), tested on tiny-sd saved to disk."""

import pytest
import torch

from harness.errors import DiffbenchError
from harness.models import MODELS, load_pipeline, resolve_dtype, weights_source
from harness.run.generate import call_kwargs, generate
from harness.steps import StepContext


@pytest.fixture(scope="module")
def saved_tiny(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    return folder


def images(pipe, spec):
    return generate(pipe, StepContext(), call_kwargs(spec, ["a red circle"], [7], 4, 5.0, 32, {}))


@pytest.mark.parametrize("model", ["tiny-sd", "sd15"])
def test_local_folder_round_trips_bit_identical(saved_tiny, tiny_pipe, tiny_spec, model):
    """sd15's loader (safety checker off) takes any SD folder, here the tiny one."""
    spec = MODELS.get(model)
    loaded = load_pipeline(spec, str(saved_tiny), torch.float32, "cpu")
    assert getattr(loaded, "safety_checker", None) is None
    assert torch.equal(images(loaded, tiny_spec), images(tiny_pipe, tiny_spec))


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DiffbenchError, match=str(tmp_path / "nope")):
        load_pipeline(MODELS.get("sd15"), str(tmp_path / "nope"), torch.float32, "cpu")


def test_weights_source_defaults():
    assert weights_source(MODELS.get("tiny-sd"), "default") == "none"
    assert weights_source(MODELS.get("sd15"), None) == MODELS.get("sd15").hub_id
    assert weights_source(MODELS.get("sd15"), "random") == "none"


def test_bad_dtype_lists_choices():
    with pytest.raises(DiffbenchError, match="float16"):
        resolve_dtype("fp8")
