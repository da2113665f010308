#!/usr/bin/env bash
# The GPU check of issue 12: one prepared script for a bare H100/H200 machine without network,
# 9 minutes 20 at most (every step runs under `timeout`, inside one overall deadline):
#   1. a venv with the Python packages installed from wheels/ beside this script (no index)
#   2. diffbench run --suite gpu-sd15 eager, then with --compile denoiser (both arms compiled)
#   3. diffbench run --suite gpu-dit eager
#   3b. diffbench run --suite gpu-flux eager: FLUX.1-dev (12B, random weights) in bf16 at
#      1024 px, 28 steps, one image per cell. Its build (~34 GB of random weights on the host,
#      then on the GPU) and one cell need about 2 minutes: the pass runs only when at least
#      FLUX_MIN_S are left, else a second run of the script (earlier passes then resume with
#      nothing to do) gives it its box; each run adds cells to runs/gpu-flux
#   4. a summary read from the leaderboard.csv files: baseline ms per image, each method's
#      speedup with its 95 % interval, MFU (exit 1 when a row is an error)
# A pass its time box cuts short keeps its finished rows (the leaderboard is rewritten after
# every cell); running the script again resumes each pass where it stopped (finished cells are
# skipped), so a second run completes what one did not (the compiled pass: torch.compile
# of each method's UNet takes tens of seconds per cell).
#
# Filling wheels/ (once, on a machine with network, x86_64 Linux and the GPU machine's Python
# minor version, e.g. 3.11), from the repository root:
#   python3 -m pip download -d benchmarks/wheels pip      # bootstraps pip in the bare venv
#   python3 -m pip wheel -w benchmarks/wheels .           # diffbench + every dependency
# PyPI's Linux torch wheel is the CUDA build; its nvidia-* and triton wheels come along (~3 GB).
# From another OS or Python, download binaries for the target instead:
#   python3 -m pip download -d benchmarks/wheels --only-binary=:all: --python-version 3.11 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 pip torch \
#       'diffusers>=0.30' 'transformers>=4.40' 'accelerate>=0.30' 'safetensors>=0.4' \
#       'numpy>=1.24' 'tqdm>=4.60' 'scipy>=1.10' 'torchmetrics>=1.4' 'pillow>=9' \
#       'matplotlib>=3.7'                                 # = pyproject.toml's dependencies
#   python3 -m pip wheel --no-deps -w benchmarks/wheels .
# Then carry the repository with benchmarks/wheels/ to the GPU machine and run, from anywhere:
#   bash benchmarks/gpu_check.sh               # results under runs/ of the repository
#   bash benchmarks/gpu_check.sh --dry-run     # the same steps on CPU with tiny models (checks
#                                              # the script itself; no GPU, no wheels needed)
# torch.compile on a GPU needs a C compiler and Python's headers (Triton builds its launcher);
# without them the compiled pass is skipped with a message.
#
# Options: --dry-run; --skip-install (use $PYTHON's packages as they are); --out DIR (runs/);
# --summary (only print the summary of the leaderboards under --out).
# Environment: PYTHON (python3; --dry-run: activate the project's venv first), GPU_CHECK_VENV
# (runs/gpu-venv), GPU_CHECK_WHEELS (benchmarks/wheels), time boxes in seconds:
# TOTAL_S (560), INSTALL_S (100), SD15_S (190), SD15_COMPILED_S (110), DIT_S (70), FLUX_S (180),
# FLUX_MIN_S (120: the gpu-flux pass is skipped when less is left).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELS="${GPU_CHECK_WHEELS:-$HERE/wheels}"
DRY=0
INSTALL=1
SUMMARY_ONLY=0
OUT="$ROOT/runs"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --skip-install) INSTALL=0 ;;
        --summary) SUMMARY_ONLY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
START=$SECONDS
TOTAL_S=${TOTAL_S:-560}
PY=${PYTHON:-python3}
log() { printf '\n[gpu_check %3ds] %s\n' "$((SECONDS - START))" "$*"; }
# the box of the next step: its own limit, or what is left of the overall deadline
box() { local left=$((TOTAL_S - (SECONDS - START))); echo $(($1 < left ? $1 : left)); }

if [[ $SUMMARY_ONLY == 1 ]]; then
    INSTALL=0
elif [[ $DRY == 1 ]]; then
    # CPU (one thread), float32, tiny models of the same pipeline classes, 64 px, 2 steps, one
    # image; short paired timing. tiny-dit (32 px only, as DiT's size is fixed by its weights)
    # has 4 blocks, so gpu-dit's delta_dit num_blocks=8 and block_drop drop_max=8 (of DiT-XL/2's
    # 28) become 2; the compiled pass runs baseline and deepcache
    # only (CPU inductor: ~15 s per compiled graph). The real architectures' FLOPs and a tiny
    # generation of every cell are checked by tests/test_gpu_suites.py.
    OUT="$OUT/gpu-check-dry-run"
    rm -rf "$OUT"
    SD15_S=${SD15_S:-300}; SD15_COMPILED_S=${SD15_COMPILED_S:-240}; DIT_S=${DIT_S:-120}
    FLUX_S=${FLUX_S:-120}; FLUX_MIN_S=${FLUX_MIN_S:-20}
    TOTAL_S=${TOTAL_DRY_S:-1000}
    COMMON=(--device cpu --dtype float32 --resolution 64 --steps 2 --n-images 1 --batch-size 1
            --timing calls=1,min_rounds=2,max_rounds=3,budget_s=1,warmup=0,warmup_max=2
            --threads 1)  # one thread: two OpenMP threads on a busy 2-core box stall 10-100x
    SD15_ARGS=(--model tiny-sd)
    COMPILED_ARGS=(--method baseline --method deepcache:interval=3)
    DIT_ARGS=(--model tiny-dit --resolution 32 --n-images 2 --batch-size 2 --method baseline
              --method fora:interval=3 --method delta_dit:interval=2,num_blocks=2
              --method block_drop:drop_max=2,until=0.5)
    # tiny-flux (FluxPipeline, 2 double + 2 single blocks) for gpu-flux's FLUX.1-dev: its
    # delta_dit num_blocks=16 and block_drop drop_max=16 (of 57 blocks) become 2
    FLUX_ARGS=(--model tiny-flux --method baseline --method fora:interval=3
               --method delta_dit:interval=2,num_blocks=2 --method block_drop:drop_max=2,until=0.5)
else
    SD15_S=${SD15_S:-190}; SD15_COMPILED_S=${SD15_COMPILED_S:-110}; DIT_S=${DIT_S:-70}
    FLUX_S=${FLUX_S:-180}; FLUX_MIN_S=${FLUX_MIN_S:-120}
    # the suites' models, steps, resolution and method settings; one image per SD-1.5 cell
    # (random weights: speed only), short paired timing (CUDA events: little noise)
    COMMON=(--timing calls=1,min_rounds=4,max_rounds=16,budget_s=8,warmup=1,warmup_max=4)
    SD15_ARGS=(--n-images 1)
    COMPILED_ARGS=()
    DIT_ARGS=()
    # one image per cell (a 1024 px FLUX.1-dev image takes seconds), two warm-up calls at most
    FLUX_ARGS=(--n-images 1
               --timing calls=1,min_rounds=3,max_rounds=8,budget_s=20,warmup=1,warmup_max=2)
fi

# --- 1. packages ----------------------------------------------------------------------------
if [[ $SUMMARY_ONLY == 1 ]]; then
    cd "$ROOT" || exit 2
elif [[ $INSTALL == 1 && ( $DRY == 0 || -d $WHEELS ) ]]; then
    VENV=${GPU_CHECK_VENV:-$ROOT/runs/gpu-venv}
    log "installing from $WHEELS into $VENV (no network)"
    if ! ls "$WHEELS"/pip-*.whl >/dev/null 2>&1; then
        echo "gpu_check: no pip wheel in $WHEELS; fill it as the header of this script says" >&2
        exit 2
    fi
    PIP_WHEEL=$(ls "$WHEELS"/pip-*.whl | head -n 1)
    [[ -x $VENV/bin/python ]] || "$PY" -m venv --without-pip "$VENV" || exit 2
    PY="$VENV/bin/python"
    # pip runs from its own wheel to install itself, then diffbench and its dependencies
    timeout -k 10 "$(box "${INSTALL_S:-100}")" bash -c '
        "$0" -c "import pip" 2>/dev/null || "$0" "$1/pip" install -q --no-index "$1" &&
        "$0" -m pip install -q --no-index --no-compile --find-links "$2" diffbench' \
        "$PY" "$PIP_WHEEL" "$WHEELS" || { echo "gpu_check: install failed" >&2; exit 2; }
    # the checkout's code runs (python -m harness from its root imports it first); the diffbench
    # wheel brings the dependencies, so an older wheel in wheels/ does no harm
    cd "$ROOT" || exit 2
elif [[ $DRY == 1 ]]; then
    log "dry run: no $WHEELS, install step skipped; using $PY's packages and $ROOT"
    cd "$ROOT" || exit 2
else
    log "--skip-install: using $PY's packages"
    cd "$ROOT" || exit 2
fi
DIFFBENCH=("$PY" -m harness run --no-progress)
[[ $SUMMARY_ONLY == 1 ]] || "$PY" - "$DRY" <<'EOF' || exit 2
import sys, torch, diffusers, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}")
if sys.argv[1] == "0":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no GPU (CPU-only wheel, or no driver); --dry-run checks "
                 "the script on CPU")
    print("GPU:", torch.cuda.get_device_name(0))
EOF
command -v nvidia-smi >/dev/null && [[ $DRY == 0 && $SUMMARY_ONLY == 0 ]] &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

# --- 2./3. the passes ------------------------------------------------------------------------
CUT=()
run_pass() {  # name seconds out-dir args...
    local name=$1 limit; limit=$(box "$2"); local out=$3; shift 3
    if ((limit < 20)); then
        log "$name: skipped, the overall deadline is reached"
        return
    fi
    log "$name: diffbench run $* --out $out  (time box ${limit}s)"
    timeout -k 15 "$limit" "${DIFFBENCH[@]}" "$@" --out "$out"
    local rc=$?
    if ((rc == 124 || rc == 137)); then
        CUT+=("$name")
        log "$name: cut by its ${limit}s box; finished rows are kept, run again to resume"
    elif ((rc != 0)); then
        log "$name: diffbench exited $rc"
    fi
}

compile_ready() {  # torch.compile's needs on this machine; prints why not
    if [[ $DRY == 0 ]] && ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
        echo "no C compiler (cc/gcc): Triton cannot build its launcher"; return 1
    fi
    "$PY" -c 'import os, sysconfig, sys; h = os.path.join(sysconfig.get_paths()["include"],
"Python.h"); sys.exit(0 if os.path.exists(h) else f"no {h} (python3-dev): Triton needs it")' \
        2>&1 || return 1
    "${DIFFBENCH[@]}" --help | grep -q -- '--compile' || { echo "diffbench has no --compile"; return 1; }
}

if [[ $SUMMARY_ONLY == 0 ]]; then
run_pass "gpu-sd15 eager" "$SD15_S" "$OUT/gpu-sd15" --suite gpu-sd15 "${COMMON[@]}" \
    "${SD15_ARGS[@]}"
if why=$(compile_ready); then
    # FLOPs are the eager cells' (the same graph): the summary derives compiled MFU from them
    run_pass "gpu-sd15 compiled" "$SD15_COMPILED_S" "$OUT/gpu-sd15-compiled" --suite gpu-sd15 \
        "${COMMON[@]}" "${SD15_ARGS[@]}" --compile denoiser --flops off "${COMPILED_ARGS[@]}"
else
    log "gpu-sd15 compiled: SKIPPED: $why"
fi
run_pass "gpu-dit eager" "$DIT_S" "$OUT/gpu-dit" --suite gpu-dit "${COMMON[@]}" "${DIT_ARGS[@]}"
if (($(box "$FLUX_S") >= FLUX_MIN_S)); then
    run_pass "gpu-flux eager" "$FLUX_S" "$OUT/gpu-flux" --suite gpu-flux "${COMMON[@]}" \
        "${FLUX_ARGS[@]}"
else
    CUT+=("gpu-flux eager")
    log "gpu-flux eager: skipped, $(box "$FLUX_S")s left and its build + one cell need" \
        "${FLUX_MIN_S}s; run the script again"
fi
fi

# --- 4. summary -------------------------------------------------------------------------------
log "summary"
"$PY" - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path

out = Path(sys.argv[1])
bad = 0


def num(row, key):
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return float("nan")


def show(name, eager=None):
    global bad
    path = out / name / "leaderboard.csv"
    if not path.exists():
        print(f"\n{name}: no leaderboard (the pass did not finish a cell)")
        return []
    rows = list(csv.DictReader(path.open()))
    ok = [r for r in rows if r.get("status") == "ok"]
    base = next((r for r in ok if r["method"] == "baseline"), None)
    first = rows[0] if rows else {}
    print(f"\n{name}: {len(ok)} of {len(rows)} rows ok; {first.get('model')} "
          f"{first.get('resolution')}px {first.get('steps')} steps {first.get('dtype')} "
          f"on {first.get('device_name')} (torch {first.get('torch')})")
    if base:
        print(f"  baseline {1000 * num(base, 'latency_s'):.1f} ms per image "
              f"[{1000 * num(base, 'latency_ci_lo'):.1f}, {1000 * num(base, 'latency_ci_hi'):.1f}]"
              f", {num(base, 'flops_per_image') / 1e12:.4g} TFLOPs, MFU {num(base, 'mfu'):.3f}")
    flops = {(r["method"], r["params"]): r for r in (eager or [])}
    head = f"  {'method':16s} {'ms/image':>9s} {'speedup [95% interval]':>26s} " \
           f"{'FLOPs':>6s} {'MFU':>6s}"
    print(head + ("  compile_s recompiles breaks" if eager is not None else ""))
    for r in rows:
        if r.get("status") != "ok":
            bad += 1
            print(f"  {r['method']:16s} ERROR {r.get('error', '')[:100]}")
            continue
        mfu, mark = num(r, "mfu"), ""
        twin = flops.get((r["method"], r["params"]))
        if mfu != mfu and twin is not None and num(r, "latency_s") > 0:  # compiled: eager FLOPs
            mfu, mark = num(twin, "mfu") * num(twin, "latency_s") / num(r, "latency_s"), "*"
        speed = (f"{num(r, 'speedup'):.3f} [{num(r, 'speedup_ci_lo'):.3f}, "
                 f"{num(r, 'speedup_ci_hi'):.3f}]") if r.get("speedup_ci_lo") else \
            f"{num(r, 'speedup'):.3f}"
        ratio = r.get("flops_ratio") or (twin or {}).get("flops_ratio") or ""
        line = (f"  {r['method']:16s} {1000 * num(r, 'latency_s'):9.1f} {speed:>26s} "
                f"{ratio[:6]:>6s} {mfu:6.3f}{mark}")
        if eager is not None:
            line += (f"  {r.get('compile_s', ''):>9s} {r.get('recompiles', ''):>10s} "
                     f"{r.get('graph_breaks', ''):>6s}")
        print(line)
    return rows


eager = show("gpu-sd15")
compiled = show("gpu-sd15-compiled", eager)
if compiled:
    print("  (* MFU from the eager cell's FLOPs; speedups against the baseline compiled the "
          "same way)")
    e = next((r for r in eager if r["method"] == "baseline" and r.get("status") == "ok"), None)
    c = next((r for r in compiled if r["method"] == "baseline" and r.get("status") == "ok"), None)
    if e and c:
        print(f"  compiled baseline vs eager baseline: "
              f"{num(e, 'latency_s') / num(c, 'latency_s'):.3f}x (unpaired, two passes)")
show("gpu-dit")
show("gpu-flux")
print(f"\nleaderboards under {out}; commit one as leaderboards/gpu-sd15-<device>.csv")
sys.exit(1 if bad else 0)
EOF
rc=$?
((${#CUT[@]})) && log "cut short by their time boxes: ${CUT[*]}; run the script again to resume"
log "done in $((SECONDS - START)) s (exit $rc)"
exit $rc
