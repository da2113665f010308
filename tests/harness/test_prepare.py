"""The prepared-artifact cache: keyed by model, method and full config; trained once."""

from __future__ import annotations

import dataclasses
import types

import torch

from harness.prepare import ArtifactCache, PrepareData, artifact_key, prepare_artifacts


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    steps: int = 3


class FakeSpec:
    """Quacks like a MethodSpec of a training method; counts prepare calls."""

    name, prepares = "fake", True

    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, pipe, config, data):
        self.calls += 1
        return {"w": torch.full((2,), float(config.steps))}


def data() -> PrepareData:
    return PrepareData(model="tiny-sd@none", prompts=("a",), log=lambda _: None)


def test_trains_once_then_loads_from_disk(tmp_path):
    spec = FakeSpec()
    first = prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    again = prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    assert spec.calls == 1 and torch.equal(first["fake"]["w"], again["fake"]["w"])
    assert len(list(tmp_path.glob("fake-*.safetensors"))) == 1
    assert len(list(tmp_path.glob("fake-*.json"))) == 1


def test_key_changes_with_config_and_model():
    assert artifact_key("m", "fake", FakeConfig(3)) != artifact_key("m", "fake", FakeConfig(4))
    assert artifact_key("m", "fake", FakeConfig(3)) != artifact_key("n", "fake", FakeConfig(3))


def test_unreadable_file_is_retrained(tmp_path, capsys):
    spec = FakeSpec()
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    next(tmp_path.glob("fake-*.safetensors")).write_bytes(b"garbage")
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    assert spec.calls == 2 and "unreadable prepared weights" in capsys.readouterr().out


def test_methods_without_prepare_get_nothing():
    spec = types.SimpleNamespace(name="plain", prepares=False)
    assert prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(None)) == {}
