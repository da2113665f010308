"""`diffbench` command line. Exit codes: 0 all well, 1 some cell failed (or a regression, or a
write failed mid-run), 2 bad input (one line, before any work)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import EXIT_FAILED, EXIT_OK, DiffbenchError

DEFAULT_SUITE = "default"
SETTING_FLAGS = ("model", "weights", "prompts", "n_images", "steps", "guidance", "resolution",
                 "seed", "dtype", "device", "batch_size", "compile")


def _run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a suite (default: the embedded suite, offline, on CPU)")
    p.add_argument("--suite", help="suite TOML file or built-in suite name (default: default)")
    p.add_argument("--method", action="append", metavar="NAME[:K=V,...]",
                   help="method to run, repeatable (replaces the suite's methods)")
    p.add_argument("--param", action="append", metavar="K=V",
                   help="method parameter for every --method, repeatable")
    p.add_argument("--attack", action="append", metavar="NAME[:K=V,...]",
                   help="attack on every method's pipeline, repeatable, 'none' for the "
                        "unattacked cell (replaces the suite's attacks; see list attacks)")
    p.add_argument("--model", action="append", help="model, repeatable")
    p.add_argument("--seed", action="append", type=int, help="base seed, repeatable")
    for flag in ("weights", "prompts", "dtype", "device"):
        p.add_argument(f"--{flag}")
    for flag in ("n-images", "steps", "resolution", "batch-size"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--compile", action="append", metavar="MODE",
                   help="torch.compile after the method: off, denoiser, regional, max-autotune; "
                        "repeatable (an axis of the grid)")
    p.add_argument("--timing", action="append", metavar="K=V[,K=V]",
                   help="timing settings, repeatable: calls, min_rounds, max_rounds, target, "
                        "budget_s, reject_k, warmup, warmup_max, agree, threads, flops")
    p.add_argument("--threads", type=int, help="torch CPU threads (timing.threads; 0: default)")
    p.add_argument("--flops", choices=("auto", "real", "fake", "off"))
    p.add_argument("--out", help="output folder (default: diffbench-runs/<suite name>)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: cells in this process (default); ray: cells and prompt shards "
                        "as Ray tasks, one GPU each (cluster from RAY_ADDRESS, else local Ray)")
    p.add_argument("--shards", type=int, default=1,
                   help="split each cell's prompts into this many shards (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="ray backend, local Ray only: CPU workers to start (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbench", description="Benchmark efficient and safe text-to-image diffusion.",
        epilog="exit codes: 0 all well; 1 some cell failed, a regression, or a write failed "
               "mid-run; 2 bad input (one line, before any work)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    from harness.mini.train import cli as train_cli
    from harness.reporting import report, score

    score.add_parser(sub)
    report.add_parser(sub)
    train_cli.add_arguments(sub.add_parser(
        "train-mini", help="train the embedded mini-sd (CLIP, VAE, UNet) from a seed, resumable"))
    p = sub.add_parser("list", help="list registered methods, attacks, metrics, models or "
                                   "prompt sets")
    p.add_argument("what", choices=("methods", "attacks", "metrics", "models", "prompts"))
    p = sub.add_parser("leaderboard", help="rebuild the CSV leaderboard from cell JSON files")
    p.add_argument("run_dir", help="output folder of a run")
    p.add_argument("--csv", help="where to write (default: RUN_DIR/leaderboard.csv)")
    p = sub.add_parser("compare",
                       help="compare a leaderboard with a reference; exit 1 on regression")
    p.add_argument("new")
    p.add_argument("ref")
    p.add_argument("--tol", action="append", metavar="COLUMN=SPEC",
                   help="tolerance: REL, or lower|higher|both:REL[:ABS]; repeatable")
    p.add_argument("--all", action="store_true",
                   help="show every compared value, not only failures")
    return parser


def _version() -> str:
    from harness import __version__

    return f"diffbench {__version__}"


def cmd_run(args: argparse.Namespace) -> int:
    from harness import params
    from harness.run import config, job, preflight

    if not 1 <= args.shards <= 4096:
        raise DiffbenchError(f"--shards={args.shards} is out of range; allowed [1, 4096]")
    if args.workers is not None and not 1 <= args.workers <= 4096:
        raise DiffbenchError(f"--workers={args.workers} is out of range; allowed [1, 4096]")
    if args.workers is not None and args.backend != "ray":
        raise DiffbenchError("--workers needs --backend ray (the local backend runs one cell "
                             "at a time in this process)")
    overrides: dict[str, Any] = {}
    for flag in SETTING_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[{"model": "models", "seed": "seeds"}.get(flag, flag)] = value
    methods = None
    if args.method:
        extra = params.parse_assignments(args.param, "--param")
        methods = [config.parse_method(m) for m in args.method]
        for m in methods:
            m["params"] = {**m["params"], **extra}
    elif args.param:
        raise DiffbenchError("--param needs --method")
    attacks = [config.parse_method(a) for a in args.attack] if args.attack else None
    run_config = config.load_suite(args.suite or DEFAULT_SUITE, overrides, methods, attacks)
    timing = params.parse_assignments([a for t in args.timing or () for a in t.split(",")],
                                      "--timing")
    timing.update({k: getattr(args, k) for k in ("threads", "flops") if getattr(args, k)
                   is not None})
    if timing:
        timing = {**dataclasses.asdict(run_config.timing), **timing}
        run_config = dataclasses.replace(run_config,
                                         timing=params.build(config.Timing, timing, "timing"))
    out = Path(args.out or Path("diffbench-runs") / run_config.name)
    preflight.check(run_config)  # the whole grid, before the first line of output
    print(f"diffbench: {len(run_config.cells)} cells -> {out}", file=sys.stderr)
    csv_path = job.run(run_config, out, progress=not args.no_progress, backend=args.backend,
                          shards=args.shards, workers=args.workers)
    print(_summary(csv_path))
    print(f"leaderboard: {csv_path}")
    from harness.run.store import CellStore

    return _failed(job.failures(run_config, CellStore(out)), len(run_config.cells))


def _failed(lines: list[str], total: int, what: str = "cell") -> int:
    """Exit code 1 with one stderr line per failed cell, 0 when there are none."""
    for line in lines:
        print(f"diffbench: failed: {line}", file=sys.stderr)
    if lines:
        print(f"diffbench: {len(lines)} of {total} {what}s failed (their errors are in the "
              "leaderboard's error column and, with tracebacks, in cells/<key>.json)",
              file=sys.stderr)
    return EXIT_FAILED if lines else EXIT_OK


SUMMARY = ("model", "method", "params", "attack", "steps", "compile", "speedup", "latency_s",
           "flops_ratio", "peak_mem_mb", "fd_clip", "fid", "clip_score", "psnr", "nsfw_ratio",
           "concept_ratio", "attack_s", "status")


def _summary(csv_path: Path) -> str:
    """The leaderboard's main columns: speed with its interval, cost, quality, status; columns
    no row has a value for are left out."""
    from harness.run.leaderboard import read_csv

    def shown(r: dict[str, str], c: str) -> str:
        value = r.get(c, "")
        if c == "speedup" and value and r.get("speedup_ci_lo"):
            value = f"{float(value):.3f} [{float(r['speedup_ci_lo']):.3f}, " \
                    f"{float(r['speedup_ci_hi']):.3f}]"
        return value if len(value) <= 40 else value[:37] + "..."

    records = read_csv(csv_path)
    cols = [c for c in SUMMARY if any(r.get(c) for r in records) or c in ("model", "method")]
    rows = [[shown(r, c) for c in cols] for r in records]
    widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [list(cols), *rows])


def cmd_list(args: argparse.Namespace) -> int:
    from harness.attack import ATTACKS
    from harness.method import METHODS
    from harness.metric import METRICS
    from harness.models import MODELS
    from harness.prompts import PROMPTS

    if args.what in ("methods", "attacks"):
        for name, spec in (METHODS if args.what == "methods" else ATTACKS).items():
            fields = ", ".join(f"{f.name}={f.default!r}" for f in spec.fields())
            print(f"{name:12s} {spec.doc}" + (f"\n{'':12s} params: {fields}" if fields else ""))
    elif args.what == "metrics":
        for name, cls in METRICS.items():
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
    elif args.what == "models":
        for name, spec in MODELS.items():
            source = ("embedded weights" if spec.embedded_weights else spec.hub_id
                      if spec.default_weights == "pretrained" else "random weights")
            print(f"{name:14s} {spec.resolution}px {spec.steps} steps  {source}  "
                  f"{spec.description}")
    else:
        for name, _ in PROMPTS.items():
            print(name)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.run.job import failure_line
    from harness.run.leaderboard import write_leaderboard
    from harness.run.store import CellStore

    store = CellStore(args.run_dir)
    if not store.cells_dir.is_dir():
        raise DiffbenchError(f"no cell results under {store.cells_dir}")
    target = Path(args.csv or store.out_dir / "leaderboard.csv")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise DiffbenchError(f"cannot write {target}: {target.parent} is not a writable folder")
    records = store.records()
    path = write_leaderboard(records, target)
    print(f"leaderboard: {path}")
    failed = [failure_line(r["key"], r["cell"]["model"], r["cell"]["method"], r["cell"]["params"],
                           r.get("error", "")) for r in records if r["status"] != "ok"]
    return _failed(failed, len(records))


def cmd_compare(args: argparse.Namespace) -> int:
    from harness import params
    from harness.reporting import compare

    for path in (args.new, args.ref):
        if not os.path.isfile(path):
            raise DiffbenchError(f"leaderboard not found: {path}")
    tolerances = compare.parse_tolerances(params.parse_assignments(args.tol, "--tol"))
    diffs = compare.compare(args.new, args.ref, tolerances)
    print(compare.render(diffs, only_changes=not args.all))
    bad = sum(d.regression for d in diffs)
    print(f"{bad} regression(s) in {len(diffs)} compared values")
    return EXIT_FAILED if bad else EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from harness.reporting import score

    path, failed, tried = score.score(args.run_dir, tuple(args.metrics), args.csv)
    print(f"leaderboard: {path}")
    return _failed(failed, tried)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.reporting import report
    from harness.run.job import failure_line

    path = report.report(args.run_dir, args.out, args.quality, args.columns, args.diff)
    print(f"report: {path}")
    rows = report.load_rows(args.run_dir)
    failed = [failure_line(r["config_hash"], r["model"], r["method"], r["params"],
                           r.get("error", "")) for r in rows if r.get("status") != "ok"]
    return _failed(failed, len(rows))


def cmd_train_mini(args: argparse.Namespace) -> int:
    from harness.mini.train import cli as train_cli

    return train_cli.run(args)


COMMANDS = {"train-mini": cmd_train_mini, "run": cmd_run, "list": cmd_list,
            "leaderboard": cmd_leaderboard, "compare": cmd_compare, "score": cmd_score,
            "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet library start-up notes
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DiffbenchError as exc:
        print(f"diffbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("diffbench: interrupted; finished cells are kept: run the same command again to "
              "resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
