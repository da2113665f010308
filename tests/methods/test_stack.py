import pytest

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.run.config import Settings, make_cell
from harness.stack import resolve_method
from tests.methods.contract import MethodContract


class TestDeepCacheSolverStack(MethodContract):
    method = "deepcache+solver"
    identity_params = {"interval": 1, "scheduler": "ddim"}
    active_params = {"deepcache.interval": 3, "solver": {"scheduler": "dpmpp", "steps": 8}}


def test_single_name_is_the_registered_spec():
    assert resolve_method("deepcache") is METHODS.get("deepcache")


def test_stack_config_is_nested_per_member():
    spec = resolve_method("deepcache+solver")
    config = spec.config({"interval": 2, "solver.scheduler": "unipc"})
    assert config.deepcache.interval == 2 and config.solver.scheduler == "unipc"
    assert config.deepcache == METHODS.get("deepcache").config({"interval": 2})


def test_stack_canonical_params_in_cell():
    cell = make_cell(Settings(model="tiny-sd"), "deepcache+solver", {"deepcache.interval": 4})
    assert cell.method == "deepcache+solver"
    assert cell.params.startswith('{"deepcache":{') and '"interval":4' in cell.params


def test_unknown_member_gets_did_you_mean():
    with pytest.raises(DiffbenchError, match="did you mean 'deepcache'"):
        resolve_method("deepcach+solver")


@pytest.mark.parametrize("name,match", [
    ("deepcache+deepcache", "twice"),
    ("baseline+solver", "baseline cannot be stacked"),
    ("deepcache+", "empty member"),
])
def test_malformed_stacks_are_refused(name, match):
    with pytest.raises(DiffbenchError, match=match):
        resolve_method(name)


def test_members_sharing_a_part_are_refused_with_reason(monkeypatch):
    spec = METHODS.get("solver")
    monkeypatch.setitem(METHODS._items, "solver2", type(spec)("solver2", spec.config_cls,
                                                             spec.module, spec.touches))
    with pytest.raises(DiffbenchError) as err:
        resolve_method("solver+solver2")
    assert "cannot be stacked: both change scheduler" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_parameter_names_field_and_range():
    with pytest.raises(DiffbenchError, match=r"deepcache.interval=0 is out of range"):
        resolve_method("deepcache+solver").config({"interval": 0})
    with pytest.raises(DiffbenchError, match="has no parameter 'ratio'"):
        resolve_method("deepcache+solver").config({"ratio": 0.5})


def test_failed_member_apply_removes_earlier_members(tiny_pipe):
    from harness.steps import StepContext

    spec = resolve_method("solver+deepcache")
    scheduler = tiny_pipe.scheduler
    with pytest.raises(DiffbenchError, match="branch"):
        spec.apply(tiny_pipe, spec.config({"branch": 6}), StepContext())
    assert tiny_pipe.scheduler is scheduler  # solver was undone
    spec.apply(tiny_pipe, spec.config({}), StepContext()).remove()  # nothing left applied


def test_stack_counters_sum_members_and_clear_them(tiny_pipe):
    from harness.steps import StepContext

    spec = resolve_method("deepcache+solver")
    with spec.apply(tiny_pipe, spec.config({}), StepContext()) as handle:
        first, second = handle.handles
        first.stats.update(cache_calls=3, cache_skips=2)
        second.stats.update(cache_calls=1)
        assert dict(handle.stats) == {"cache_calls": 4, "cache_skips": 2}
        handle.stats.clear()
        assert dict(handle.stats) == {} and first.stats == {} and second.stats == {}
