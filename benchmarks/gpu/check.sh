#!/usr/bin/env bash
# The one-shot GPU check: run from the repository root on a bare GPU machine (benchmarks/gpu/README.md
# gives the device tool's exact call). Within CHECK_BUDGET_S (default 470 s, under 8 minutes) it
#
#   1. installs decord and builds causal-conv1d and mamba-ssm from the sources carried in
#      benchmarks/gpu/deps/ (fetch_deps.sh), for this GPU's architecture only, both at once, in
#      the background;
#   2. meanwhile runs the GPU tests that need no kernels (tests/gpu -k "not kernels");
#   3. installs the kernels and runs the tests that need them (-k kernels);
#   4. runs benchmarks/gpu/bench_gpu.py with what time is left;
#   5. prints a summary table, also written to $OUT/summary.md.
#
# A stage that fails or runs out of time is recorded and the next one runs: without kernels the
# tests and benchmarks still run on the torch-op path. Logs go to $OUT (the device tool brings back
# at most 8 files): summary.md, build-causal-conv1d.log, build-mamba-ssm.log, tests.log, bench.log,
# bench_gpu.json, bench_gpu.md.
#
# Environment: OUT (default benchmarks/out/gpu-check), CHECK_BUDGET_S, CHECK_BUILD_S (the build's
# own limit, default 330), CHECK_MAX_JOBS (parallel compiles per package, default 11), PYTHON
# (default python3, the one with torch), CHECK_WORK (scratch, default /tmp/ms-temba-gpu-check),
# TORCH_CUDA_ARCH_LIST (default: this GPU's, e.g. 9.0), CHECK_TRIM (default 1: build only the
# kernels ms_temba calls, patch_sources.py --trim; 0: the packages' full dtype set, which took over
# 330 s on the H200 machine), CHECK_TESTS_WITHOUT_KERNELS (default 1; 0 skips stage 2, e.g. on a
# second call once it has passed), CHECK_BENCH_ARGS (more arguments for bench_gpu.py, e.g.
# '--models ms_temba[fused] ms_temba[kernels]').
set -uo pipefail  # no -e: each stage's failure is recorded, and the check goes on

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/benchmarks/out/gpu-check}
BUDGET_S=${CHECK_BUDGET_S:-470}
BUILD_S=${CHECK_BUILD_S:-330}
PY=${PYTHON:-python3}
TRIM=${CHECK_TRIM:-1}
TESTS_WITHOUT_KERNELS=${CHECK_TESTS_WITHOUT_KERNELS:-1}
WORK=${CHECK_WORK:-/tmp/ms-temba-gpu-check}
DEPS=$REPO/benchmarks/gpu/deps
SITE=$WORK/site
mkdir -p "$OUT" "$WORK/src" "$WORK/wheels" "$SITE"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

ROWS=()
record() {  # stage, status, seconds, note
    ROWS+=("| $1 | $2 | $3 | $4 |")
    echo "== [$(elapsed) s] $1: $2 ($3 s) $4"
}
outcome() {  # exit status -> status word
    case $1 in 0) echo ok ;; 124|137) echo "timed out" ;; *) echo "failed (exit $1)" ;; esac
}
# The ms_temba code from this tree, then what this script installed, then the machine's packages.
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU side of the comparisons runs the CPU scan's pure-PyTorch path: its C++ recurrence would
# be compiled first (~25 s, with g++ and ninja) and the check compares the CUDA paths, not that.
export MS_TEMBA_CPU_SCAN_EXTENSION=0

# ---------------------------------------------------------------- 0. the machine
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
    echo "cpus: $(nproc); nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo none)"
    "$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")' 2>&1
    echo '```'
} > "$WORK/machine.md"
cat "$WORK/machine.md"
# torch's cpp_extension finds the toolkit from the nvcc on PATH; where that is a wrapper outside
# the toolkit (/usr/local/bin/nvcc on our development image), the CUDA headers are not found.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST

# ---------------------------------------------------------------- 1. install decord, start the builds
t=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DEPS"/decord-*.whl > "$WORK/decord.log" 2>&1
rc=$?; record "install decord" "$(outcome $rc)" $(( $(date +%s) - t )) "$(tail -1 "$WORK/decord.log")"

build() {  # package sdist-glob max-jobs: unpack, patch, build a wheel; the log names the package
    local name=$1 sdist dir
    sdist=$(ls "$DEPS"/$2 2>/dev/null | head -1)
    [ -n "$sdist" ] || { echo "no $2 in $DEPS: run benchmarks/gpu/fetch_deps.sh first"; return 2; }
    dir="$WORK/src/$(basename "$sdist" .tar.gz)"
    rm -rf "$dir" && tar xzf "$sdist" -C "$WORK/src" && "$PY" "$REPO/benchmarks/gpu/patch_sources.py" $PATCH_ARGS "$dir" || return 2
    cd "$dir" && MAX_JOBS=$3 MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        "$PY" -m pip wheel -v --no-deps --no-build-isolation --no-index -w "$WORK/wheels" .
}
# torch >= 2.14's headers require C++20, and mamba-ssm's setup.py pins C++17 (patch_sources.py).
CXX_STD=$("$PY" -c 'import pathlib, torch.utils.cpp_extension as c
print("--cxx-std 20" if "C++20 or later" in (pathlib.Path(c.include_paths()[0]) / "ATen" / "ATen.h").read_text() else "")' 2>/dev/null)
PATCH_ARGS="$CXX_STD$([ "$TRIM" = 1 ] && echo ' --trim')"
export WORK REPO DEPS PY PATCH_ARGS
BUILD_START=$(date +%s)
# 4 compile units in causal-conv1d and 11 in mamba-ssm: all of them at once on a 16-core machine
# (CHECK_MAX_JOBS caps both, for a smaller machine).
JOBS=${CHECK_MAX_JOBS:-11}
( timeout --kill-after=10 "$BUILD_S" bash -c "$(declare -f build); build causal-conv1d 'causal_conv1d-*.tar.gz' $(( JOBS < 4 ? JOBS : 4 ))" \
    > "$WORK/build-causal-conv1d.log" 2>&1; echo $? > "$WORK/build-causal-conv1d.rc" ) &
( timeout --kill-after=10 "$BUILD_S" bash -c "$(declare -f build); build mamba-ssm 'mamba_ssm-*.tar.gz' $JOBS" \
    > "$WORK/build-mamba-ssm.log" 2>&1; echo $? > "$WORK/build-mamba-ssm.rc" ) &

# ---------------------------------------------------------------- 2. tests without kernels, meanwhile
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs --timeout=240 tests/gpu)
"$PY" -c "import pytest_timeout" 2>/dev/null || PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs tests/gpu)
t=$(date +%s)
if [ "$TESTS_WITHOUT_KERNELS" = 1 ]; then
    echo "### tests/gpu -k 'not kernels' (during the build)" >> "$OUT/tests.log"
    OMP_NUM_THREADS=4 timeout --kill-after=10 $(( BUILD_S - $(elapsed) + 30 )) "${PYTEST[@]}" -k "not kernels" >> "$OUT/tests.log" 2>&1
    rc=$?; record "tests without kernels" "$(outcome $rc)" $(( $(date +%s) - t )) "$(tail -1 "$OUT/tests.log")"
else
    record "tests without kernels" skipped 0 "CHECK_TESTS_WITHOUT_KERNELS=0"
fi

# ---------------------------------------------------------------- 3. the kernels: finish, install, test
wait
for name in causal-conv1d mamba-ssm; do
    rc=$(cat "$WORK/build-$name.rc" 2>/dev/null || echo 1)
    # nvcc's --ptxas-options=-v prints every kernel's registers: megabytes; keep the rest.
    grep -vE "ptxas info|bytes stack frame|Compiling entry|Function properties|Used [0-9]+ registers" \
        "$WORK/build-$name.log" > "$OUT/build-$name.log"
    record "build $name (sm ${TORCH_CUDA_ARCH_LIST})" "$(outcome "$rc")" $(( $(date +%s) - BUILD_START )) \
        "$(ls "$WORK/wheels" | grep -i "^${name//-/_}-" | head -1)"
done
t=$(date +%s)
if ls "$WORK"/wheels/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WORK"/wheels/*.whl > "$WORK/install.log" 2>&1
fi
KERNELS=$("$PY" -c 'from ms_temba import ops; from ms_temba.ops import fused; print(f"kernels={ops.HAS_CUDA_KERNELS} fused={fused.mamba_inner_fn is not None}")' 2>&1 | tail -1)
record "install kernels" "$([[ $KERNELS == "kernels=True fused=True" ]] && echo ok || echo missing)" $(( $(date +%s) - t )) "$KERNELS"

if [[ $KERNELS == kernels=True* ]]; then
    t=$(date +%s)
    echo "### tests/gpu -k kernels" >> "$OUT/tests.log"
    # At most 150 s, and 90 s kept for the benchmarks.
    timeout --kill-after=10 $(( $(left) > 240 ? 150 : ($(left) > 120 ? $(left) - 90 : 30) )) "${PYTEST[@]}" -k kernels >> "$OUT/tests.log" 2>&1
    rc=$?; record "tests with kernels" "$(outcome $rc)" $(( $(date +%s) - t )) "$(tail -1 "$OUT/tests.log")"
else
    record "tests with kernels" skipped 0 "no kernels"
fi

# ---------------------------------------------------------------- 4. benchmarks, with the time left
t=$(date +%s)
bench_s=$(( $(left) - 25 ))
if [ "$bench_s" -gt 30 ]; then
    # The script stops starting cases at --budget-s and writes its results after every case;
    # timeout is the backstop for one case that runs long.
    cases_s=$(( bench_s > 120 ? bench_s - 60 : bench_s / 2 ))  # the rest: the case in progress at the end
    timeout --kill-after=5 "$bench_s" "$PY" benchmarks/gpu/bench_gpu.py --out "$OUT" --budget-s "$cases_s" ${CHECK_BENCH_ARGS:-} \
        > "$OUT/bench.log" 2>&1
    rc=$?; record "bench_gpu.py" "$(outcome $rc)" $(( $(date +%s) - t )) "new cases for $cases_s s"
else
    record "bench_gpu.py" skipped 0 "no time left"
fi

# ---------------------------------------------------------------- 5. summary
{
    cat "$WORK/machine.md"
    echo
    echo "| stage | status | s | note |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "total $(elapsed) s of a $BUDGET_S s budget"
    echo
    grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/tests.log" | head -40
    echo
    [ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
