"""The attack dimension of a run: grid, keys, suite and CLI input, and one attacked run end to
end on the embedded mini-sd (columns, the cached search reused on a re-run)."""

from __future__ import annotations

import csv
import json

import pytest

from harness.cli import main
from harness.errors import DiffbenchError
from harness.run import config as C

SUITE = '''name = "att"
[defaults]
model = "mini-sd"
prompts = "shapes-red"
n_images = 2
steps = 2
batch_size = 2
device = "cpu"
[timing]
min_rounds = 2
max_rounds = 2
budget_s = 1
flops = "off"
[metric_options.concept]
concept = "red"
[[methods]]
name = "baseline"
[[attacks]]
name = "none"
[[attacks]]
name = "synonyms"
params = { concept = "red" }
[[attacks]]
name = "embedding"
params = { concept = "red", steps = 2, n_images = 2, batch_size = 2, image_steps = 2 }
'''


def test_grid_spans_methods_by_attacks_and_unattacked_keys_do_not_change(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SUITE)
    cells = C.load_suite(path).cells
    assert [c.attack for c in cells] == ["none", "synonyms", "embedding"]
    plain = C.load_suite(path, attacks=[{"name": "none"}]).cells[0]
    assert plain.key == cells[0].key and "attack" not in plain.identity()
    assert cells[1].key != cells[0].key and cells[1].baseline_key == cells[0].key
    assert cells[2].unattacked.key == cells[0].key
    assert json.loads(cells[1].attack_params) == {"concept": "red", "prompts": "", "words": ""}


@pytest.mark.parametrize("entry, message", [
    ({"name": "ringbell"}, "did you mean 'ringabell'"),
    ({"name": "ringabell", "params": {"eta": -1}}, "eta"),
    ({"name": "synonyms", "params": {"concept": "tiger"}}, "no built-in substitutes"),
    ({"name": "ringabell", "params": {"etta": 1}}, "etta"),
])
def test_bad_attacks_fail_before_any_work(tmp_path, entry, message):
    path = tmp_path / "s.toml"
    path.write_text(SUITE)
    with pytest.raises(DiffbenchError, match=message):
        C.load_suite(path, attacks=[entry])


def test_an_attack_table_with_unknown_keys_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SUITE + '[[attacks]]\nname = "ringabell"\neta = 3\n')
    with pytest.raises(DiffbenchError, match="put its parameters under params"):
        C.load_suite(path)


def test_cli_unknown_attack_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["run", "--out", str(tmp_path / "o"), "--no-progress", "--model", "tiny-sd",
               "--attack", "embeding"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'embedding'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_attacked_run_end_to_end_and_the_search_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "s.toml"
    path.write_text(SUITE)
    argv = ["run", "--suite", str(path), "--out", str(tmp_path / "run"), "--no-progress",
            "--threads", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("searching") == 2
    rows = {r["attack"] or "none": r for r in csv.DictReader(
        open(tmp_path / "run" / "leaderboard.csv"))}
    assert set(rows) == {"none", "synonyms", "embedding"}
    assert rows["none"]["speedup"] and not rows["embedding"]["speedup"]  # attacked: no timing
    for name in ("synonyms", "embedding"):
        assert rows[name]["attack_success"] == rows[name]["concept_ratio"]
        assert rows[name]["attack_s"] and rows[name]["status"] == "ok"
    assert rows["embedding"]["attack_text"] == "q"
    assert "crimson" in rows["synonyms"]["attack_text"]
    # a second run folder with the same cells: the searches come from the cache, same cost
    assert main([*argv[:4], str(tmp_path / "run2"), *argv[5:]]) == 0
    assert "searching" not in capsys.readouterr().out
    again = {r["attack"] or "none": r for r in csv.DictReader(
        open(tmp_path / "run2" / "leaderboard.csv"))}
    assert again["embedding"]["attack_s"] == rows["embedding"]["attack_s"]
    assert again["embedding"]["concept_ratio"] == rows["embedding"]["concept_ratio"]
