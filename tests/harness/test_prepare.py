"""The prepared-artifact cache: keyed by model, method and full config; trained once."""

from __future__ import annotations

import dataclasses
import time
import types

import torch

from harness.prepare import (
    ArtifactCache,
    PrepareData,
    artifact_key,
    prepare_artifacts,
    train_seconds,
)


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    steps: int = 3


class FakeSpec:
    """Quacks like a MethodSpec of a training method; counts prepare calls."""

    name, prepares = "fake", True

    def __init__(self) -> None:
        self.calls = 0

    def training_prompts(self, config, data):  # as MethodSpec's default: every cell prompt
        return data.prompts

    def prepare(self, pipe, config, data):
        self.calls += 1
        time.sleep(0.05)
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


def test_key_changes_with_config_model_prompts_and_seed():
    base = data()
    key = artifact_key(base, "fake", FakeConfig(3))
    assert key == artifact_key(data(), "fake", FakeConfig(3))
    assert key != artifact_key(base, "fake", FakeConfig(4))
    assert key != artifact_key(dataclasses.replace(base, model="tiny-sd@x"), "fake", FakeConfig(3))
    assert key != artifact_key(dataclasses.replace(base, prompts=("b",)), "fake", FakeConfig(3))
    assert key != artifact_key(dataclasses.replace(base, seed=1), "fake", FakeConfig(3))
    assert key == artifact_key(dataclasses.replace(base, device="cuda"), "fake", FakeConfig(3))


def test_unreadable_file_is_retrained(tmp_path, capsys):
    spec = FakeSpec()
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    next(tmp_path.glob("fake-*.safetensors")).write_bytes(b"garbage")
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    assert spec.calls == 2 and "unreadable prepared weights" in capsys.readouterr().out


def test_methods_without_prepare_get_nothing():
    spec = types.SimpleNamespace(name="plain", prepares=False)
    assert prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(None)) == {}


def test_train_seconds_are_those_of_the_training_run_also_when_loaded(tmp_path):
    spec = FakeSpec()
    assert train_seconds(spec, FakeConfig(), data(), ArtifactCache(tmp_path)) is None
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    trained = train_seconds(spec, FakeConfig(), data(), ArtifactCache(tmp_path))
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))  # loaded
    assert spec.calls == 1 and trained is not None and trained >= 0.04
    assert train_seconds(spec, FakeConfig(), data(), ArtifactCache(tmp_path)) == trained
    plain = types.SimpleNamespace(name="plain", prepares=False)
    assert train_seconds(plain, FakeConfig(), data(), ArtifactCache(tmp_path)) is None


class ConceptOnlySpec(FakeSpec):
    """A training method that declares it reads none of the cell's prompts."""

    def training_prompts(self, config, data):
        return ()


def test_a_method_that_reads_no_cell_prompts_is_trained_once_for_all_prompt_sets(tmp_path):
    spec, cache = ConceptOnlySpec(), ArtifactCache(tmp_path)
    for prompts in (("a",), ("b", "c")):
        prepare_artifacts(spec, None, FakeConfig(), dataclasses.replace(data(), prompts=prompts),
                          cache)
    assert spec.calls == 1
    plain = FakeSpec()  # reads the cell's prompts: trained per prompt set
    for prompts in (("a",), ("b", "c")):
        prepare_artifacts(plain, None, FakeConfig(), dataclasses.replace(data(), prompts=prompts),
                          cache)
    assert plain.calls == 2


def test_damaged_or_missing_meta_is_retrained(tmp_path, capsys):
    spec = FakeSpec()
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    meta = next(tmp_path.glob("fake-*.json"))
    meta.write_text('{"method": "fa')
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    meta.unlink()
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    assert spec.calls == 3 and "meta file is missing or damaged" in capsys.readouterr().out
    prepare_artifacts(spec, None, FakeConfig(), data(), ArtifactCache(tmp_path))
    assert spec.calls == 3  # healed: loaded again
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def test_unwritable_cache_is_one_line_naming_the_variable(tmp_path):
    import pytest

    from harness.errors import WriteFailed

    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteFailed, match="set DIFFBENCH_CACHE to a writable folder"):
        prepare_artifacts(FakeSpec(), None, FakeConfig(), data(), ArtifactCache(tmp_path / "file"))
