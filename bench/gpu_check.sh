#!/usr/bin/env bash
# GPU checks of the same-host GPU path (CuPy block kernels + CUDA IPC), for the
# lent GPU machine (see DEVICE.md): no network, Python 3.12 with torch,
# cupy-cuda13x, numpy, pytest, hypothesis; pyzmq from carried .whl/ (posix_ipc is no longer needed).
#
#   bash bench/gpu_check.sh            # from the repository root; results in ${OUT:-/tmp/out}
#
# Steps (each bounded by `timeout`, all within GPU_CHECK_BUDGET seconds, default 540):
#   1. install .whl/*.whl into a temp dir (if .whl/ exists)
#   2. make embresume, embresume.ipc, embresume.kernels, embresume.bench importable
#      without pip-installing the repo: a temp tree $T/pkg/embresume whose entries are
#      symlinks to embresume/*, plus ipc -> ipc/, kernels -> kernels/, bench -> bench/
#      (commands run with $T/pkg as the working directory, so the repo's own
#      embresume/ -- which lacks those three -- is never picked up first)
#   3. nvidia-smi, versions, import check
#   4. python -m pytest -q -m gpu tests/ -x          -> $OUT/pytest_gpu.log
#   5. python -m embresume.bench.gpu_bench --out $OUT/gpu_bench.json  -> $OUT/gpu_bench.log
#   6. a short summary (last)
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

left() {  # seconds left of the budget, minus a reserve for the summary
    local now; now=$(date +%s)
    echo $(( BUDGET - (now - START) - 15 ))
}
cap() {   # cap STEP_MAX: the step's timeout, never beyond the budget
    local l; l=$(left)
    if [ "$l" -lt "$1" ]; then echo $(( l > 5 ? l : 5 )); else echo "$1"; fi
}
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

# 1. carried wheels -------------------------------------------------------------
SITE=$T/site
mkdir -p "$SITE"
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    if timeout "$(cap 90)" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
            "$REPO"/.whl/*.whl > "$OUT/pip.log" 2>&1; then
        say "installed $(ls "$REPO"/.whl/*.whl | wc -l) wheel(s) from .whl/"
    else
        say "WARNING: wheel install failed (see $OUT/pip.log)"
    fi
else
    say "no .whl/ directory: using whatever pyzmq the interpreter has"
fi

# 2. package layout ---------------------------------------------------------------
PKG=$T/pkg
mkdir -p "$PKG/embresume"
for f in "$REPO"/embresume/* "$REPO"/embresume/.[!.]*; do
    [ -e "$f" ] || continue
    b=$(basename "$f")
    case "$b" in __pycache__|ipc|kernels|bench) continue ;; esac
    ln -s "$f" "$PKG/embresume/$b"
done
ln -s "$REPO/ipc" "$PKG/embresume/ipc"
ln -s "$REPO/kernels" "$PKG/embresume/kernels"
ln -s "$REPO/bench" "$PKG/embresume/bench"
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$PKG" || exit 1

# 3. machine and imports -------------------------------------------------------------
GPU_NAME=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
           | head -1)
say "GPU: ${GPU_NAME:-none (nvidia-smi unavailable)}"
timeout "$(cap 120)" "$PY" - > "$OUT/imports.log" 2>&1 <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda available:", torch.cuda.is_available())
try:
    import cupy
    print("cupy", cupy.__version__)
except Exception as e:
    print("cupy: NOT importable:", type(e).__name__, e)
import embresume, embresume.ipc.cuda_ipc, embresume.kernels.cuda, embresume.bench.gpu_bench
print("embresume from", embresume.__file__)
print("CUDA kernels:", embresume.kernels.cuda.unavailable_reason() or "available")
EOF
IMPORT_RC=$?
sed 's/^/    /' "$OUT/imports.log"
[ $IMPORT_RC -eq 0 ] || say "ERROR: the package does not import (rc $IMPORT_RC)"

# 4. GPU tests ---------------------------------------------------------------------------
say "pytest -m gpu (timeout $(cap 300)s)"
timeout "$(cap 300)" "$PY" -m pytest -q -m gpu -x -rs -p no:cacheprovider "$REPO/tests" 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -40
PYTEST_RC=${PIPESTATUS[0]}
say "pytest exit code $PYTEST_RC"

# 5. benchmark -------------------------------------------------------------------------------
say "gpu_bench (timeout $(cap 200)s)"
timeout "$(cap 200)" "$PY" -m embresume.bench.gpu_bench --out "$OUT/gpu_bench.json" 2>&1 \
    | tee "$OUT/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}
say "gpu_bench exit code $BENCH_RC"

# 5b. end to end through the endpoints: cuda_ipc next to shm and the baselines ----------------
say "embresume bench, GPU path end to end (timeout $(cap 150)s)"
timeout "$(cap 150)" "$PY" -m embresume.cli bench --quick --sizes 1024,8192 --paths memcpy,shm,cuda_ipc,mp-queue \
    --skip-concurrency --skip-allocator --no-plots --no-progress --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e_bench.log" | tail -25
E2E_RC=${PIPESTATUS[0]}
say "e2e bench exit code $E2E_RC"

# 6. summary -----------------------------------------------------------------------------------
echo
echo "================ gpu_check summary ================"
echo "GPU:     ${GPU_NAME:-none}"
echo "imports: $([ $IMPORT_RC -eq 0 ] && echo ok || echo "FAILED rc=$IMPORT_RC")"
echo "pytest:  rc=$PYTEST_RC  $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/pytest_gpu.log" | tail -1)"
echo "bench:   rc=$BENCH_RC   e2e bench: rc=${E2E_RC:-n/a} (table above, $OUT/e2e/results.json)"
if [ -s "$OUT/gpu_bench.json" ]; then
    timeout 30 "$PY" - "$OUT/gpu_bench.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"target:  {r['target']}")
print(f"{'tokens':>7} {'D2D TB/s':>9} {'fused TB/s':>11} {'ratio':>6} {'us':>7} {'memcpy':>7} {'fancy':>7} ok")
for x in r["rows"]:
    print(f"{x['tokens']:>7} {x['d2d_tbps']:9.2f} {x['fused_tbps']:11.2f} {x['fused_ratio']:6.2f} "
          f"{x['fused_us']:7.1f} {x['memcpy_tbps']:7.2f} {x['fancy_tbps']:7.2f} {x['fused_correct']}")
EOF
fi
echo "logs:    $OUT"
[ $IMPORT_RC -eq 0 ] && [ $PYTEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
