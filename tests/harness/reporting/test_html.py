"""report.html: self-contained, sortable, every figure inline; rendered in headless Chromium
(skipped with a reason where it is not installed)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html import unescape

import pytest

from harness.cli import main
from harness.reporting import html
from tests.harness.reporting.test_report import DC3, DEFAULTS, make_row

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def test_compact_values_keep_four_digits_and_the_interval():
    row = make_row(speedup="2.0413", speedup_ci_lo="2.0100", speedup_ci_hi="2.0700",
                   latency_s="0.150000", latency_ci_lo="0.140000", latency_ci_hi="0.160000",
                   flops_ratio="1.0000", kd_clip="0.000188858")
    assert html.compact(row, "speedup") == "2.041 ± 0.030"
    assert html.compact(row, "latency_s") == "0.1500 ± 0.0100"  # latency_ci_*, not latency_s_*
    assert html.compact(row, "flops_ratio") == "1.000"
    assert html.compact(row, "kd_clip") == "0.0001889"
    assert html.compact(row, "psnr") == ""


def page_of(rows, **figures):
    ok = [r for r in rows if r["status"] == "ok"]
    return html.page("run<1>", rows, ["speedup", "fd_clip", "psnr"], DEFAULTS, {"tiny-sd": ok},
                     figures.get("plots", {}), figures.get("grids", {}))


def test_page_is_self_contained_and_escaped():
    png = b"\x89PNG\r\n\x1a\nfake"
    rows = [make_row(speedup="1.0000"),
            make_row("deepcache", '{"interval":5}', speedup="2.0000", fd_clip="0.15"),
            make_row("deepcache", DC3, speedup="1.5000"),
            make_row("solver", '{"steps":7}', status="error", error="RuntimeError: <boom>")]
    text = page_of(rows, plots={"tiny-sd": [("pareto-x.png", png)]})
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched
    assert "<link" not in text and "<script src" not in text
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert [base64.b64decode(u) for u in uris] == [png]
    assert "diffbench report: run&lt;1&gt;" in text and "RuntimeError: &lt;boom&gt;" in text
    body = text.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == 4 and body.count('class=failed') == 1  # failed row last
    assert "<code>interval=5</code>" in body  # only what differs from the defaults
    assert '<span class="muted">defaults</span>' in body.split("<tr")[3]
    assert 'data-sort="2.0"' in body and "How to read this" in text
    assert "<i>(counted)</i>" not in text  # only the shown columns are explained
    assert "<code>speedup</code> ↑" in text and "(measured)" in text


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A real mini-sd run (two finished cells, one failed) and its report."""
    run = tmp_path_factory.mktemp("html") / "run"
    args = ("run --model mini-sd --method baseline --method deepcache:interval=2 "
            "--method deepcache:branch=9 --steps 3 --n-images 2 --batch-size 2 --timing "
            "min_rounds=2,max_rounds=2,calls=1,warmup=0 --flops off --device cpu --no-progress "
            "--threads 1 --out").split()
    assert main([*args, str(run)]) == 1  # the branch=9 cell fails, the others finish
    assert main(["report", str(run), "--diff"]) == 1
    return run / "report"


def test_real_report_has_table_plots_and_grids(report_dir):
    text = (report_dir / "report.html").read_text()
    assert text.count('src="data:image/png;base64,') == 5  # fd_clip, clip_score, psnr; 2 grids
    for name in ("pareto-mini-sd-fd_clip.png", "grid-mini-sd.png", "diff-mini-sd.png"):
        assert (report_dir / name).is_file() and name in text
    assert "deepcache.branch=9 is out of range" in text
    md = (report_dir / "report.md").read_text()
    assert "(pareto-mini-sd-psnr.png)" in md and "[report.html](report.html)" in md


CHECK_JS = """
<script>
window.addEventListener("load", function () {
  var table = document.querySelector("table.sortable"), heads = table.tHead.rows[0].cells;
  function column(i) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[i].textContent.trim(); });
  }
  function find(name) {
    return Array.prototype.findIndex.call(heads, function (h) {
      return h.textContent.trim().split(" ")[0] === name; });
  }
  var out = {errors: window.__errors, before: column(0)};
  heads[0].click(); heads[0].click();
  out.number_desc = column(0);
  var s = find("speedup");
  heads[s].click();
  out.speedup_asc = column(s);
  out.speedup_sort = heads[s].getAttribute("aria-sort");
  out.images = Array.prototype.map.call(document.images, function (im) {
    return [im.alt, im.complete && im.naturalWidth > 0]; });
  var pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""
ERRORS_JS = ("<script>window.__errors=[];window.addEventListener('error',function(e){"
             "window.__errors.push(String(e.message));});var e0=console.error;"
             "console.error=function(m){window.__errors.push(String(m));e0.apply(console,"
             "arguments);};</script>")


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get "
                                             "install chromium)")
def test_report_loads_sorts_and_shows_images_in_chromium(report_dir, tmp_path):
    page = (report_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + ERRORS_JS, 1)
                     .replace("</body>", CHECK_JS + "</body>", 1))
    done = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                    "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no result from Chromium: {done.stderr[-500:]}"
    out = json.loads(unescape(found.group(1)))
    assert out["errors"] == []
    assert out["before"] == ["1", "2", "3"]  # baseline, deepcache, the failed cell
    assert out["number_desc"] == ["3", "2", "1"]
    speeds = out["speedup_asc"]
    assert out["speedup_sort"] == "ascending" and speeds[-1] == ""  # empty (failed) last
    values = [float(v.split(" ")[0]) for v in speeds[:-1]]
    assert values == sorted(values)
    assert len(out["images"]) == 5 and all(ok for _, ok in out["images"]), out["images"]
    shot = tmp_path / "shot.png"
    chromium(f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1200,900",
             f"--screenshot={shot}", (report_dir / "report.html").as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
