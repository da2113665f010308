"""The shared contract every method adapter passes (ARCHITECTURE.md, "How to add": a method)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest
import torch

from harness.errors import DiffbenchError
from harness.prepare import ArtifactCache, PrepareData, prepare_artifacts
from harness.run.generate import call_kwargs, generate, model_call
from harness.seeds import image_seed
from harness.stack import resolve_method
from harness.steps import StepContext

PROMPTS = ["a large red circle on a blue background", "a small green star on a white background",
           "a large yellow square on a black background"]


class DiTLike:
    """A pipeline whose denoiser is a transformer, not a UNet: UNet-only methods refuse it."""

    transformer = torch.nn.Linear(1, 1)


@contextmanager
def one_line_error(pattern: str) -> Iterator[None]:
    """The block raises a DiffbenchError matching `pattern` whose message is a single line."""
    with pytest.raises(DiffbenchError, match=pattern) as err:
        yield
    assert "\n" not in str(err.value)


def run(pipe: Any, spec: Any, handle: Any, prompts: list[str], first_index: int = 0,
        ctx: StepContext | None = None, steps: int = 6) -> torch.Tensor:
    """Generate `prompts` on the tiny pipeline with per-image seeds; uint8 images."""
    ctx = ctx or StepContext()
    seeds = [image_seed(0, first_index + i) for i in range(len(prompts))]
    overrides = handle.call_kwargs if handle is not None else {}
    return generate(pipe, ctx, call_kwargs(spec, prompts, seeds, steps, 5.0, 32, overrides))


def prepare_method(pipe: Any, name: str, params: dict | None, log: Any = None) -> tuple:
    """(config, artifact) of a training method prepared on the tiny pipeline, no cache."""
    spec = resolve_method(name)
    config = spec.config(params)
    data = PrepareData(model="tiny-sd@none", prompts=tuple(PROMPTS),
                       log=log if log is not None else (lambda _: None))
    return config, spec.prepare(pipe, config, data)


def changed_while_applied(pipe: Any, name: str, params: dict | None) -> set[str]:
    """Names of the UNet parameters that differ from the original while the method is applied."""
    before = {k: v.clone() for k, v in pipe.unet.named_parameters()}
    config, artifact = prepare_method(pipe, name, params)
    with resolve_method(name).apply(pipe, config, StepContext(), {name: artifact}):
        now = dict(pipe.unet.named_parameters())
        return {k for k, v in before.items() if not torch.equal(v, now[k])}


def state_fingerprint(pipe: Any) -> dict:
    """Everything a method could leave behind: parameters, hooks, instance attributes."""
    out = {"scheduler": id(pipe.scheduler)}
    for comp in ("unet", "transformer", "text_encoder", "vae"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        out[comp] = {k: v.clone() for k, v in model.state_dict().items()}
        for name, mod in model.named_modules():
            out[f"{comp}.{name}.hooks"] = (len(mod._forward_hooks), len(mod._forward_pre_hooks))
            out[f"{comp}.{name}.dict"] = sorted(k for k in mod.__dict__ if not k.startswith("_"))
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())),
                                                               torch.Tensor):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} changed"
        else:
            assert a[key] == b[key], f"{key} changed: {a[key]} != {b[key]}"


_ARTIFACT_CACHES: dict[str, ArtifactCache] = {}
_BASELINES: dict[tuple[str, int], tuple[Any, torch.Tensor]] = {}  # -> (pipeline, images)


class MethodContract:
    """Inherit and set `method`, `identity_params` (bit-identical to baseline, or None when the
    method has no identity setting) and `active_params` (a setting that changes the output)."""

    method: ClassVar[str]
    identity_params: ClassVar[dict | None] = None
    active_params: ClassVar[dict | None] = None

    @pytest.fixture(autouse=True)
    def _model_under_test(self, tiny_spec: Any) -> None:
        self.model_spec = tiny_spec  # what prepare_data describes: name and pipeline call

    def prepare_data(self, prompts: list[str] | tuple[str, ...] = tuple(PROMPTS)) -> PrepareData:
        """What the runner hands a training method's prepare for the model under test."""
        return PrepareData(model=f"{self.model_spec.name}@none", prompts=tuple(prompts),
                           log=lambda _: None, call_kwargs=model_call(self.model_spec))

    @pytest.fixture()
    def baseline_images(self, tiny_pipe: Any, tiny_spec: Any) -> torch.Tensor:
        """The plain pipeline's images, generated once per pipeline (every test restores it)."""
        key = (tiny_spec.name, id(tiny_pipe))
        if key not in _BASELINES:  # the pipeline is kept in the entry: its id is never reused
            _BASELINES[key] = (tiny_pipe, run(tiny_pipe, tiny_spec, None, PROMPTS[:2]))
        return _BASELINES[key][1]

    def apply(self, pipe: Any, params: dict | None, ctx: StepContext | None = None) -> Any:
        """Apply the method; a training method is prepared first (in-memory cache per class)."""
        spec = resolve_method(self.method)
        config = spec.config(params)
        return spec.apply(pipe, config, ctx or StepContext(), self.artifacts(pipe, spec, config))

    def artifacts(self, pipe: Any, spec: Any, config: Any) -> dict | None:
        if not spec.prepares:
            return None
        cache = _ARTIFACT_CACHES.setdefault(type(self).__qualname__, ArtifactCache(None))
        return prepare_artifacts(spec, pipe, config, self.prepare_data(), cache)

    def test_prepare_leaves_pipeline_unchanged(self, tiny_pipe, baseline_images):
        """(baseline_images: a first call, on which transformers installs its own lazy
        output-capturing hooks in the text encoder, is not the method's doing)"""
        spec = resolve_method(self.method)
        if not spec.prepares:
            pytest.skip("method trains nothing")
        before = state_fingerprint(tiny_pipe)
        artifact = spec.prepare(tiny_pipe, spec.config(self.active_params), self.prepare_data())
        assert artifact and all(isinstance(t, torch.Tensor) for t in artifact.values())
        assert_same_state(before, state_fingerprint(tiny_pipe))

    def test_prepare_reads_only_its_declared_training_prompts(self, tiny_pipe):
        """Artifacts are keyed by MethodSpec.training_prompts: cell prompts outside them must not
        change what prepare trains (else two prompt sets would share wrong weights)."""
        spec = resolve_method(self.method)
        if not spec.prepares:
            pytest.skip("method trains nothing")
        config = spec.config(self.active_params)
        data = self.prepare_data()
        more = self.prepare_data((*PROMPTS, "a small white cross on a red background"))
        if spec.training_prompts(config, data) != spec.training_prompts(config, more):
            pytest.skip("this setting trains on every prompt of the cell")
        first, second = spec.prepare(tiny_pipe, config, data), spec.prepare(tiny_pipe, config, more)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)

    def test_registered_with_documented_fields(self) -> None:
        spec = resolve_method(self.method)
        assert spec.doc, "method module needs a one-line docstring"
        for field in spec.fields():
            assert field.metadata.get("doc"), f"field {field.name} needs a doc"

    def test_identity_setting_matches_baseline(self, tiny_pipe, tiny_spec, baseline_images):
        if self.identity_params is None:
            pytest.skip("method has no identity setting")
        ctx = StepContext()
        with self.apply(tiny_pipe, self.identity_params, ctx) as handle:
            images = run(tiny_pipe, tiny_spec, handle, PROMPTS[:2], ctx=ctx)
        assert torch.equal(images, baseline_images)

    def test_active_setting_changes_output(self, tiny_pipe, tiny_spec, baseline_images):
        if self.active_params is None:
            pytest.skip("method has no active setting")
        ctx = StepContext()
        with self.apply(tiny_pipe, self.active_params, ctx) as handle:
            handle.stats.clear()  # the runner clears the counters before the images' calls
            images = run(tiny_pipe, tiny_spec, handle, PROMPTS[:2], ctx=ctx)
            counters = dict(handle.stats)  # ... and reads them after
        assert all(isinstance(k, str) and isinstance(v, int) for k, v in counters.items())
        assert images.shape == baseline_images.shape
        assert not torch.equal(images, baseline_images)

    def test_remove_restores_pipeline_exactly(self, tiny_pipe, tiny_spec, baseline_images):
        before = state_fingerprint(tiny_pipe)
        ctx = StepContext()
        handle = self.apply(tiny_pipe, self.active_params, ctx)
        run(tiny_pipe, tiny_spec, handle, PROMPTS[:2], ctx=ctx)
        handle.remove()
        assert_same_state(before, state_fingerprint(tiny_pipe))
        assert torch.equal(run(tiny_pipe, tiny_spec, None, PROMPTS[:2]), baseline_images)

    def test_apply_twice_raises(self, tiny_pipe):
        with self.apply(tiny_pipe, self.active_params):
            with pytest.raises(DiffbenchError, match="already applied"):
                self.apply(tiny_pipe, self.active_params)
        self.apply(tiny_pipe, self.active_params).remove()  # allowed again after remove()

    def test_state_resets_between_batches(self, tiny_pipe, tiny_spec):
        ctx = StepContext()
        with self.apply(tiny_pipe, self.active_params, ctx) as handle:
            run(tiny_pipe, tiny_spec, handle, PROMPTS[:2], ctx=ctx)
            second = run(tiny_pipe, tiny_spec, handle, PROMPTS[2:], first_index=2, ctx=ctx)
        ctx = StepContext()
        with self.apply(tiny_pipe, self.active_params, ctx) as handle:
            fresh = run(tiny_pipe, tiny_spec, handle, PROMPTS[2:], first_index=2, ctx=ctx)
        assert torch.equal(second, fresh)

    def test_unknown_parameter_is_one_line_error(self):
        spec = resolve_method(self.method)
        with pytest.raises(DiffbenchError) as err:
            spec.config({"no_such_param": 1})
        assert "\n" not in str(err.value) and "no_such_param" in str(err.value)
