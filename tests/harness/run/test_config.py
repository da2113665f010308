from pathlib import Path

import pytest

from harness.errors import DiffbenchError
from harness.run.config import Settings, load_suite, make_cell, parse_method


def write_suite(tmp_path, body):
    path = tmp_path / "suite.toml"
    path.write_text(body)
    return path


def test_default_suite_has_baseline_deepcache_and_solver():
    cfg = load_suite("default")
    methods = {c.method for c in cfg.cells}
    assert methods == {"baseline", "deepcache", "solver"}
    assert all(c.model == "mini-sd" and c.device in ("cpu", "cuda") for c in cfg.cells)
    assert len({c.key for c in cfg.cells}) == len(cfg.cells)


def test_grid_spans_models_seeds_and_methods(tmp_path):
    path = write_suite(tmp_path, """
[defaults]
models = ["tiny-sd"]
seeds = [0, 1]
steps = 4
device = "cpu"
[[methods]]
name = "baseline"
[[methods]]
name = "deepcache"
params = { interval = 2 }
[[methods]]
name = "deepcache"
params = { interval = 2 }
""")
    cells = load_suite(path).cells
    assert len(cells) == 4  # duplicates collapse
    assert {(c.seed, c.method) for c in cells} == {(0, "baseline"), (1, "baseline"),
                                                   (0, "deepcache"), (1, "deepcache")}


def test_model_defaults_fill_unset_settings():
    cell = make_cell(Settings(device="cpu"), "baseline", {})
    assert (cell.steps, cell.resolution, cell.guidance) == (10, 32, 5.0)
    assert cell.weights == "none"


def test_key_is_stable_and_baseline_key_points_to_baseline():
    a = make_cell(Settings(device="cpu"), "deepcache", {"interval": "3"})
    b = make_cell(Settings(device="cpu"), "deepcache", {"interval": 3})
    base = make_cell(Settings(device="cpu"), "baseline", {})
    assert a.key == b.key and a.baseline_key == base.key and base.baseline_key == base.key


@pytest.mark.parametrize("body,message", [
    ('[defaults]\nmodel = "tiny-sdd"\n', "did you mean 'tiny-sd'"),
    ('[[methods]]\nname = "deepcash"\n', "did you mean 'deepcache'"),
    ('[[methods]]\nname = "deepcache"\nparams = { intervl = 3 }\n', "did you mean 'interval'"),
    ('[defaults]\nsteps = 0\n', "settings.steps=0 is out of range"),
    ('[defaults]\nstepz = 3\n', "did you mean 'steps'"),
    ('[timing]\ncalls = 0\n', "timing.calls=0"),
    ('[timing]\nmin_rounds = 9\nmax_rounds = 3\n', "timing.min_rounds=9 is above"),
    ('[default]\n', "unknown sections"),
    ('[[methods]]\nname = "deepcache"\ninterval = 3\n', "put method parameters under params"),
    ('not toml = = 1', "not valid TOML"),
])
def test_bad_suites_fail_with_one_line(tmp_path, body, message):
    with pytest.raises(DiffbenchError, match=message) as err:
        load_suite(write_suite(tmp_path, body))
    assert "\n" not in str(err.value)


def test_missing_suite_file():
    with pytest.raises(DiffbenchError, match="suite file not found"):
        load_suite("/nonexistent/suite.toml")


def test_cli_overrides_and_methods_replace_suite():
    methods = [parse_method("deepcache:interval=2")]
    cfg = load_suite("default", {"steps": 6, "device": "cpu"}, methods)
    assert [(c.method, c.steps) for c in cfg.cells] == [("deepcache", 6)]
    assert '"interval":2' in cfg.cells[0].params


def test_parse_method():
    assert parse_method("solver:scheduler=unipc,steps=5") == {
        "name": "solver", "params": {"scheduler": "unipc", "steps": "5"}}
    assert parse_method("baseline") == {"name": "baseline", "params": {}}


@pytest.mark.parametrize("name", sorted(p.stem for p in
                                        (Path(__file__).parents[3] / "harness" / "suites").glob(
                                            "*.toml")))
def test_every_built_in_suite_loads(name):
    """Built-in suites parse, name known models/methods/prompt sets and valid parameters."""
    cfg = load_suite(name)
    assert cfg.cells and len({c.key for c in cfg.cells}) == len(cfg.cells)
