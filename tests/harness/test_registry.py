import pytest

from harness.errors import DiffbenchError
from harness.registry import Registry, UnknownNameError


def make() -> Registry[int]:
    reg: Registry[int] = Registry("widget")
    reg.register("deepcache")(1)
    reg.register("solver")(2)
    return reg


def test_get_and_names_sorted():
    reg = make()
    assert reg.get("solver") == 2 and reg.names() == ["deepcache", "solver"]
    assert "deepcache" in reg and len(reg) == 2


def test_unknown_name_suggests_closest_in_one_line():
    with pytest.raises(UnknownNameError) as err:
        make().get("deepcach")
    message = str(err.value)
    assert "did you mean 'deepcache'" in message and "\n" not in message
    assert isinstance(err.value, DiffbenchError)


def test_unknown_name_without_close_match_still_suggests_nearest_and_lists_known():
    with pytest.raises(UnknownNameError, match=r"known: deepcache, solver") as err:
        make().get("nosuch")
    assert "did you mean '" in str(err.value)


def test_empty_registry_has_no_suggestion():
    with pytest.raises(UnknownNameError) as err:
        Registry("thing").get("x")
    assert "did you mean" not in str(err.value)


def test_duplicate_name_refused_but_same_object_idempotent():
    reg = make()
    reg.register("solver")(2)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("solver")(3)


@pytest.mark.parametrize("bad", ["", "Deep", "deep cache"])
def test_names_are_lower_case_without_spaces(bad):
    with pytest.raises(ValueError):
        make().register(bad)


def test_loader_runs_once_on_first_lookup():
    calls = []
    reg: Registry[int] = Registry("thing", loader=lambda: calls.append(1) or reg.register("a")(1))
    assert reg.names() == ["a"] and reg.get("a") == 1 and calls == [1]
