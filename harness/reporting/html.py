"""report.html: one self-contained page (CSS, JS and images inline, nothing fetched) with, per
model, the sortable leaderboard table, the failed cells, the speed-quality plots and the image
grids; then how to read the columns and the environment card (pure: rows and images in, text
out)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from harness.reporting.tables import (
    Row,
    arrow,
    best_rows,
    higher_is_better,
    interval,
    number,
    present,
    row_labels,
    short_params,
    slug,
    text,
    varying,
)
from harness.run.leaderboard import ENVIRONMENT

SPEED = ("speedup", "flops_ratio", "peak_mem_mb")  # the page's speed columns by default
# column -> (what it is, how it was obtained: "measured", "counted" or "estimated")
COLUMN_HELP: dict[str, tuple[str, str]] = {
    "speedup": ("baseline latency / this latency, from rounds timed in pairs with the "
                "baseline; the interval is over the paired rounds", "measured"),
    "latency_s": ("seconds per pipeline call (a batch), median of the timed rounds",
                  "measured"),
    "images_per_s": ("images per second at the cell's batch size", "measured"),
    "flops_ratio": ("FLOPs per image / the baseline's, counted on the model's real shapes",
                    "counted"),
    "peak_mem_mb": ("peak memory of a call in MiB (memory_kind says which: CUDA allocator "
                    "peak or process RSS)", "measured"),
    "train_s": ("seconds a training method's preparation took when it ran (cached after)",
                "measured"),
    "fd_clip": ("Frechet distance of the images' mini-CLIP features to real images'",
                "estimated"),
    "fid": ("FID: Frechet distance on the pinned Inception-v3 features", "estimated"),
    "kd_clip": ("kernel distance (KID's unbiased MMD^2, cubic kernel) on mini-CLIP features",
                "estimated"),
    "kid": ("KID on the Inception features (Binkowski et al.)", "estimated"),
    "cmmd_clip": ("CMMD: MMD with a Gaussian kernel on mini-CLIP embeddings (x1000)",
                  "estimated"),
    "cmmd": ("CMMD on the user's CLIP embeddings (Jayasumana et al. 2024)", "estimated"),
    "clip_score": ("100 x cosine of image and prompt CLIP embeddings", "estimated"),
    "adherence": ("share of images whose colour, shape and size the judge reads as the "
                  "prompt's (GenEval-style)", "estimated"),
    "pickscore": ("PickScore preference reward of image and prompt", "estimated"),
    "nsfw_ratio": ("share of images the NSFW detector flags", "estimated"),
    "concept_ratio": ("share of images showing the erased concept", "estimated"),
    "attack_success": ("concept ratio under the row's attack", "estimated"),
    "psnr": ("PSNR of each image against the baseline's image of the same prompt and seed",
             "estimated"),
    "ssim": ("SSIM against the baseline's image of the same prompt and seed", "estimated"),
}
KINDS = {
    "measured": "timed on this machine: varies between runs and machines, compare within one "
                "run; intervals are 95% from paired rounds",
    "counted": "exact: the same on every run and machine",
    "estimated": "computed from the images: deterministic for the given seeds, the interval "
                 "(95% bootstrap over images) is the uncertainty from the sample size",
}
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1500px;padding:0 16px;
color:#1a1a1a}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;
margin-top:36px}h3{font-size:15px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
td.t,th.t{text-align:left;white-space:normal}
thead th{background:#f2f2f2;cursor:pointer;position:sticky;top:0;user-select:none}
thead th[aria-sort=ascending]::after{content:" \\25B2"}
thead th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(even){background:#fafafa}tbody tr:hover{background:#eef5ff}
td.best{font-weight:700}tr.failed td{color:#a00}
.wrap{overflow-x:auto}img{max-width:100%;border:1px solid #eee;margin:6px 0}
code{font-size:12px}.muted{color:#666}
"""
SORT_JS = """
function sortKey(cell){var v=cell.getAttribute("data-sort");
  return v===null?cell.textContent.trim():v;}
function compareCells(a,b,asc){var x=sortKey(a),y=sortKey(b);
  if(x===""||y===""){return x===y?0:(x===""?1:-1);}
  var nx=Number(x),ny=Number(y);
  var r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);
  return asc?r:-r;}
document.querySelectorAll("table.sortable").forEach(function(table){
  var heads=table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads,function(th,col){
    th.title="sort by "+th.textContent;
    th.addEventListener("click",function(){
      var asc=th.getAttribute("aria-sort")!=="ascending";
      Array.prototype.forEach.call(heads,function(h){h.removeAttribute("aria-sort");});
      th.setAttribute("aria-sort",asc?"ascending":"descending");
      var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){return compareCells(a.cells[col],b.cells[col],asc);});
      rows.forEach(function(r){body.appendChild(r);});});});});
"""


def compact(row: Row, column: str) -> str:
    """The value at 4 significant digits, "± h" (half the 95% interval) at the same decimals."""
    value = number(row.get(column))
    if value is None:
        return text(row, column)
    shown = f"{value:#.4g}".rstrip(".")
    lo, hi = interval(row, column)
    if lo is None or hi is None:
        return shown
    decimals = len(shown.split(".")[1]) if "." in shown and "e" not in shown else 0
    return f"{shown} ± {(hi - lo) / 2:.{decimals}f}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def cell(value: str, sort: Any = None, cls: str = "") -> str:
    attrs = (f' data-sort="{esc(sort)}"' if sort is not None else "") + \
        (f' class="{cls}"' if cls else "")
    return f"<td{attrs}>{esc(value)}</td>"


def table(model: str, rows: Sequence[Row], failed: Sequence[Row], metrics: Sequence[str],
          defaults: dict[str, dict[str, Any]]) -> str:
    """The model's sortable table: finished rows numbered as in the plots and grids, then the
    failed ones; best value per column in bold."""
    every = [*rows, *failed]
    settings, shown = varying(every), present(rows, metrics)
    best = {c: best_rows(rows, c, higher_is_better(c)) for c in shown}
    head = ["#", "method", "params", "steps", *settings, *(c + arrow(c) for c in shown),
            "status"]
    text_cols = {"method", "params", *settings}
    ths = "".join(f'<th class="t">{esc(h)}</th>' if h in text_cols else f"<th>{esc(h)}</th>"
                  for h in head)
    body = []
    for i, r in enumerate(every):
        params = short_params(text(r, "method"), _params(r), defaults.get(text(r, "method")))
        tds = [cell(str(i + 1), i + 1), f'<td class="t">{esc(text(r, "method"))}</td>',
               f'<td class="t" title="{esc(text(r, "params"))}">'
               + (f"<code>{esc(params)}</code>" if params or text(r, "method") == "baseline"
                  else '<span class="muted">defaults</span>') + "</td>",
               cell(text(r, "steps"), number(r.get("steps"))),
               *(f'<td class="t">{esc(text(r, c))}</td>' for c in settings)]
        for c in shown:
            tds.append(cell(compact(r, c), number(r.get(c)) if text(r, c) else "",
                            "best" if i in best[c] else ""))
        status = text(r, "status")
        tds.append(f'<td class="t" title="{esc(text(r, "error"))}">{esc(status)}</td>')
        body.append(f'<tr{" class=failed" if status != "ok" else ""}>{"".join(tds)}</tr>')
    return (f'<div class="wrap"><table class="sortable" id="table-{esc(slug(model))}">'
            f"<thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _params(row: Row) -> dict[str, Any]:
    import json

    try:
        parsed = json.loads(text(row, "params") or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def model_section(model: str, rows: Sequence[Row], failed: Sequence[Row],
                  metrics: Sequence[str], defaults: dict[str, dict[str, Any]],
                  plots: Sequence[tuple[str, bytes]], grids: Sequence[tuple[str, bytes]]) -> str:
    parts = [f'<section id="model-{esc(slug(model))}"><h2>{esc(model)}</h2>',
             "<p class=muted>Click a column header to sort; values are the leaderboard's, "
             "<code>± h</code> is half the 95% interval; bold: best in the column.</p>",
             table(model, rows, failed, metrics, defaults)]
    if failed:
        items = "".join(f"<li><b>{esc(lb)}</b>: <code>{esc(text(r, 'error') or text(r, 'status'))}"
                        "</code></li>" for r, lb in zip(failed, row_labels(failed, defaults)))
        parts.append(f"<h3>Failed cells</h3><ul class=failed-cells>{items}</ul>")
    notes = dict.fromkeys([*(text(r, "note") for r in rows if text(r, "note")),
                           *(f"{c}: {text(r, c + '_warning')}" for r in rows
                             for c in present(rows, metrics) if text(r, c + "_warning"))])
    if notes:
        parts.append("<p class=muted>Notes: " + esc("; ".join(notes)) + "</p>")
    if plots:
        parts.append("<h3>Speed vs quality</h3><p class=muted>Points are numbered as the "
                     "table's # column; bars: 95% intervals of both axes; dashed: the Pareto "
                     "front.</p>")
        parts += [f'<img alt="{esc(alt)}" src="{data_uri(png)}">' for alt, png in plots]
    if grids:
        parts.append("<h3>Images</h3><p class=muted>One row per cell (numbered as the table), "
                     "the same prompt and seed in each column; the prompts are listed under "
                     "the grid.</p>")
        parts += [f'<img alt="{esc(alt)}" src="{data_uri(png)}">' for alt, png in grids]
    return "\n".join(parts) + "</section>"


def reading_guide(columns: Sequence[str]) -> str:
    """"How to read this": what each shown column is and which are exact or measured."""
    items = "".join(f"<li><code>{esc(c)}</code>{esc(arrow(c))}: {esc(COLUMN_HELP[c][0])} "
                    f"<i>({esc(COLUMN_HELP[c][1])})</i></li>" for c in columns if c in COLUMN_HELP)
    kinds = "".join(f"<li><i>{esc(k)}</i>: {esc(v)}</li>" for k, v in KINDS.items())
    return ("<section id=how-to-read><h2>How to read this</h2><p>Each row is one cell: a "
            "model, a method at its params (only those that differ from the method's defaults "
            "are shown; hover for all), the same prompts and seeds as the baseline. ↑ higher "
            "is better, ↓ lower is better.</p>"
            f"<ul>{items}</ul><p>Kinds of value:</p><ul>{kinds}</ul></section>")


def environment(rows: Sequence[Row]) -> str:
    body = "".join(f'<tr><td class="t">{esc(c)}</td><td class="t">'
                   f"{esc(', '.join(dict.fromkeys(text(r, c) for r in rows if text(r, c))) or '-')}"
                   "</td></tr>" for c in ENVIRONMENT)
    return f"<section id=environment><h2>Environment</h2><table>{body}</table></section>"


def page(title: str, rows: Sequence[Row], metrics: Sequence[str],
         defaults: dict[str, dict[str, Any]], groups: dict[str, list[Row]],
         plots: dict[str, list[tuple[str, bytes]]],
         grids: dict[str, list[tuple[str, bytes]]]) -> str:
    """The whole page; `groups`: model -> its finished rows in display order."""
    failed = [r for r in rows if text(r, "status") != "ok"]
    models = list(dict.fromkeys([*groups, *(text(r, "model") for r in failed)]))
    nav = " · ".join(f'<a href="#model-{esc(slug(m))}">{esc(m)}</a>' for m in models)
    sections = [model_section(m, groups.get(m, []),
                              [r for r in failed if text(r, "model") == m], metrics, defaults,
                              plots.get(m, []), grids.get(m, [])) for m in models]
    shown = present([r for g in groups.values() for r in g], metrics)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>diffbench report: {esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>diffbench report: {esc(title)}</h1>",
        f"<p>{len(rows)} cells ({len(failed)} failed). Models: {nav} · "
        '<a href="#how-to-read">how to read this</a> · <a href="#environment">environment</a>'
        "</p>", *sections, reading_guide(shown), environment(rows),
        f"<script>{SORT_JS}</script>", "</body></html>"]) + "\n"
