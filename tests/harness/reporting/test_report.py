"""`diffbench report`: pure table building (bold, escaping, CI), Pareto front, and a real run."""

from __future__ import annotations

import pytest
from PIL import Image

from harness.cli import main
from harness.errors import DiffbenchError
from harness.reporting import pareto, tables
from harness.reporting import report as rp

DC3 = '{"branch":0,"center":0.3,"interval":3,"power":1.4,"schedule":"uniform"}'
DC5 = '{"branch":0,"center":0.3,"interval":5,"power":1.4,"schedule":"quadratic"}'
DEFAULTS = {"deepcache": {"branch": 0, "center": 0.3, "interval": 3, "power": 1.4,
                          "schedule": "uniform"}, "solver": {"scheduler": "dpmpp", "steps": 0}}


def make_row(method="baseline", params="{}", **values):
    base = {"model": "tiny-sd", "method": method, "params": params, "steps": "10",
            "seed": "0", "prompts": "shapes", "status": "ok", "error": "", "note": "",
            "device_name": "AMD EPYC", "torch": "2.13.0+cpu", "cuda": ""}
    return {**base, **{k: str(v) for k, v in values.items()}}


@pytest.fixture
def rows():
    return [
        make_row(latency_s="0.300000", speedup="1.0000", fd_clip="0.120000",
                 fd_clip_ci_lo="0.100000", fd_clip_ci_hi="0.140000"),
        make_row("deepcache", DC3, latency_s="0.150000", speedup="2.0000", fd_clip="0.150000",
                 fd_clip_ci_lo="0.120000", fd_clip_ci_hi="0.190000", psnr="31.2000",
                 psnr_ci_lo="30.1000", psnr_ci_hi="32.3000"),
        make_row("solver", '{"scheduler":"dpmpp","steps":5}', steps="5", latency_s="0.100000",
                 speedup="3.0000", fd_clip="0.210000", psnr="24.5000"),
    ]


# --- values ------------------------------------------------------------------------------
def test_with_ci_gives_half_width_in_the_value_format(rows):
    assert tables.with_ci(rows[0], "fd_clip") == "0.120000 ± 0.020000"
    assert tables.with_ci(rows[1], "psnr") == "31.2000 ± 1.1000"
    assert tables.with_ci(rows[1], "psnr", pm="+-") == "31.2000 +- 1.1000"
    assert tables.with_ci(rows[2], "psnr") == "24.5000"  # no interval columns
    assert tables.with_ci(rows[0], "psnr") == ""  # empty stays empty


def test_directions_come_from_metric_classes_with_a_fallback(monkeypatch):
    from harness.metric import METRICS

    assert tables.higher_is_better("fd_clip") is False and tables.higher_is_better("fid") is False
    assert tables.higher_is_better("clip_score") is True and tables.higher_is_better("ssim") is True
    assert tables.higher_is_better("latency_s") is False
    assert tables.higher_is_better("images_per_s") is True  # not the latency metric's direction
    assert tables.higher_is_better("speedup") is True
    assert tables.higher_is_better("flops_ratio") is False
    assert tables.higher_is_better("no_such_column") is None
    monkeypatch.setattr(METRICS.get("fid"), "higher_is_better", True)
    assert tables.higher_is_better("fid") is True  # read from the class, not the table


def test_best_rows_respects_direction_ties_and_gaps(rows):
    assert tables.best_rows(rows, "speedup", True) == {2}
    assert tables.best_rows(rows, "latency_s", False) == {2}
    assert tables.best_rows(rows, "fd_clip", False) == {0}
    assert tables.best_rows(rows, "fd_clip", True) == {2}
    assert tables.best_rows(rows, "psnr", True) == {1}  # the baseline's empty cell is skipped
    assert tables.best_rows(rows, "speedup", None) == set()  # unknown direction: no bold
    tied = [make_row(x="1.5"), make_row(x="1.50"), make_row(x="2")]
    assert tables.best_rows(tied, "x", False) == {0, 1}
    assert tables.best_rows([make_row(x="1"), make_row(x="1")], "x", True) == set()
    assert tables.best_rows([make_row(x="1"), make_row(x="")], "x", True) == set()


def test_latex_escape():
    assert tables.latex_escape("a_b%c&d#e{f}") == r"a\_b\%c\&d\#e\{f\}"
    assert tables.latex_escape(r"x\y$") == r"x\textbackslash{}y\$"


def test_row_labels_hide_defaults_show_what_differs():
    rows = [make_row(), make_row("deepcache", DC3), make_row("deepcache", DC5),
            make_row("solver", '{"scheduler":"dpmpp","steps":5}')]
    assert tables.row_labels(rows, DEFAULTS) == [
        "baseline", "deepcache", "deepcache interval=5,schedule=quadratic", "solver steps=5"]
    assert tables.row_labels(rows[:2]) == ["baseline", "deepcache branch=0,center=0.3,interval=3,"
                                           "power=1.4,schedule=uniform"]  # defaults unknown
    seeds = [make_row(seed="0"), make_row(seed="1")]
    assert tables.row_labels(seeds) == ["baseline [seed=0]", "baseline [seed=1]"]


def test_stack_labels_name_member_params_against_member_defaults():
    params = '{"deepcache":' + DC5 + ',"tome":{"ratio":0.5,"sx":2}}'
    rows = [make_row("deepcache+tome", params), make_row(attack="none"),
            make_row(attack="ringabell")]
    defaults = tables.method_defaults(["deepcache+tome"])
    assert set(defaults["deepcache+tome"]) == {"deepcache", "tome"}
    assert tables.row_labels(rows[:1], defaults) == [
        "deepcache+tome deepcache.interval=5,deepcache.schedule=quadratic"]  # tome at defaults
    assert tables.row_labels(rows[1:]) == ["baseline [attack=none]",
                                           "baseline [attack=ringabell]"]
    long = make_row("uce", '{"preserve":"green,yellow,orange,purple,white,black"}')
    assert tables.row_labels([long], {"uce": {"preserve": ""}}) == [
        "uce preserve=green,yellow,orange,pur…"]  # 24 characters with the ellipsis
    assert tables.wrap("deepcache interval=5,schedule=quadratic", 20) == [
        "deepcache", "interval=5,", "schedule=quadratic"]


def test_pareto_front_both_directions():
    pts = [(1.0, 0.12), (2.0, 0.15), (3.0, 0.21), (2.3, 0.25), (1.5, 0.30)]
    assert pareto.pareto_front(pts, higher_y=False) == [0, 1, 2]
    assert pareto.pareto_front(pts, higher_y=True) == [4, 3, 2]
    assert pareto.pareto_front([(1.0, 1.0), (1.0, 1.0), (0.5, 1.0)], True) == [0, 1]
    assert pareto.pareto_front([], True) == []


def test_ci_error_bars(rows):
    below, above = pareto.ci_errors(rows, [0, 1, 2], "fd_clip")
    assert below == pytest.approx([0.02, 0.03, 0.0]) and above == pytest.approx([0.02, 0.04, 0.0])


# --- tables ------------------------------------------------------------------------------
def test_markdown_table_bold_ci_and_arrows(rows):
    text = tables.markdown_table(rows, ["latency_s", "fd_clip", "psnr"])
    lines = text.splitlines()
    assert lines[0] == "| # | method | params | steps | latency_s ↓ | fd_clip ↓ | psnr ↑ |"
    assert "**0.120000 ± 0.020000**" in lines[2]  # lower fd_clip wins: the baseline
    assert "**31.2000 ± 1.1000**" in lines[3] and "| 24.5000 |" in lines[4]
    assert "**0.100000**" in lines[4] and "**" not in lines[2].split("|")[4]
    seeded = tables.markdown_table([make_row(seed="0"), make_row(seed="1")], [])
    assert seeded.splitlines()[0] == "| # | method | params | steps | seed |"


def test_latex_table_booktabs_bold_and_escaping(rows):
    labels = ["base_line", "deep&cache", "solver steps=5"]
    tex = tables.latex_table("sd_15", rows, ["speedup", "fd_clip", "psnr"], labels)
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrrr}"):
        assert tex.count(cmd) == 1
    body = tex.split(r"\midrule")[1].splitlines()[1:4]
    assert body[0].startswith(r"base\_line & 10 & 1.0000 & \textbf{0.120000 $\pm$ 0.020000}")
    assert body[1].startswith(r"deep\&cache & 10 & 2.0000 & 0.150000 $\pm$ 0.035000 & "
                              r"\textbf{31.2000 $\pm$ 1.1000}")
    assert body[2] == r"solver steps=5 & 5 & \textbf{3.0000} & 0.210000 & 24.5000 \\"
    assert r"\caption{sd\_15:" in tex and r"95\%" in tex
    assert r"Speedup $\uparrow$ & FD-CLIP $\downarrow$ & PSNR $\uparrow$" in tex


def test_failed_rows_listed_in_markdown_only(rows):
    bad = make_row("solver", '{"steps":7}', status="error", error="RuntimeError: boom | 50%")
    all_rows = [*rows, bad]
    md = tables.markdown_report("run", all_rows, ["latency_s", "fd_clip"],
                                {"tiny-sd": ["pareto-tiny-sd-fd_clip.png"]})
    assert "4 cells (1 failed)" in md
    assert "- solver `{\"steps\":7}`: RuntimeError: boom \\| 50%" in md
    assert "![pareto-tiny-sd-fd_clip](pareto-tiny-sd-fd_clip.png)" in md
    assert "| device_name | AMD EPYC |" in md
    assert "| cuda | - |" in md
    tex = tables.latex_document(all_rows, ["latency_s"], DEFAULTS)
    assert "steps=7" not in tex
    assert len(tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()) == 3


def test_environment_card_distinct_values():
    card = tables.environment_card([make_row(torch="2.1"), make_row(torch="2.2"),
                                make_row(torch="2.1")])
    assert "| torch | 2.1, 2.2 |" in card and "| git_sha | - |" in card


# --- files and command -------------------------------------------------------------------
def test_missing_or_empty_run_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "leaderboard.csv").write_text("model,method,status\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and err.strip().count("\n") == 0
    (tmp_path / "other").mkdir()
    with pytest.raises(DiffbenchError, match="not a diffbench run folder"):
        rp.load_rows(tmp_path / "other")


def _size(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def test_end_to_end_real_run(tmp_path, capsys):
    from harness.run.leaderboard import write_leaderboard
    from harness.run.store import CellStore

    run = tmp_path / "run"
    args = ("run --model tiny-sd --method baseline --method deepcache:interval=2 --steps 3 "
            "--n-images 2 --batch-size 2 --timing min_rounds=2,max_rounds=2,calls=1,warmup=0 "
            "--flops off --device cpu "
            "--no-progress --out").split()
    assert main([*args, str(run)]) == 0
    assert main(["report", str(run)]) == 0
    out = run / "report"
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "## tiny-sd" in md and "| deepcache |" in md and "no speed-quality plot" in md
    assert r"\toprule" in (out / "table.tex").read_text()
    assert not list(out.glob("pareto*.png"))  # tiny-sd has no quality column
    width, height = _size(out / "grid-tiny-sd.png")
    assert height >= 2 * 64 and width >= 2 * 64 + 40  # 2 rows, 2 tiles >= 64 px, a label
    assert (out / "report.html").is_file() and not (out / "diff-tiny-sd.png").exists()

    store = CellStore(run)  # quality columns as a scored run would have them (tiny-sd has none)
    for record in store.records():
        if record["cell"]["method"] == "deepcache":
            record["metrics"].update(psnr=31.2, psnr_ci_lo=30.1, psnr_ci_hi=32.3,
                                     psnr_warning="n=2 < 10: wide interval")
        else:
            record["metrics"]["psnr_warning"] = ""
        store.write(record)
    write_leaderboard(store.records(), run / "leaderboard.csv")
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--columns", "speedup",
                 "psnr"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| speedup ↑ | psnr ↑ |" in md and " ± " in md and "latency_s" not in md
    assert "psnr: n=2 < 10: wide interval" in md  # the metric's small-sample warning
    width, height = _size(tmp_path / "rep" / "pareto-tiny-sd-psnr.png")
    assert width >= 400 and height >= 300
    assert main(["report", str(run), "--columns", "nosuch"]) == 2
    assert main(["report", str(run), "--quality", "fid"]) == 2
