#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), what benchmarks/gpu/check.sh installs on a GPU machine that
# reaches no registry, into benchmarks/gpu/deps/ (git-ignored; the device tool's `carry` takes it):
#
#   mamba-ssm, causal-conv1d   source distributions: their CUDA kernels are built there, for that
#                              GPU and that torch (a C++ extension must match torch's ABI exactly)
#   decord                     wheel (py3-none manylinux): extractors.video imports it, so the
#                              I3D / CLIP extraction tests need it even on in-memory frames
#
# Everything else the check imports is in that machine's image (torch 2.11 + CUDA 13, numpy,
# pyarrow, timm, torchvision, einops, tqdm, pyyaml, pytest, ninja, setuptools, wheel, packaging:
# /work/.library/device/KINDS.md lists it); torch is never carried.
#
# The versions: the newest of each at the time of writing, the first whose setup.py knows CUDA 13
# (a `bare_metal_version >= 13.0` branch) and whose Python code uses torch.amp's custom_fwd.
#
#   bash benchmarks/gpu/fetch_deps.sh        # idempotent: files already there are kept
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

MAMBA_SSM=mamba-ssm==2.3.2.post1
CAUSAL_CONV1D=causal-conv1d==1.7.0
DECORD=decord==0.6.0
LIMIT_MIB=48  # of the 64 MiB the device tool carries with the working tree; the tree needs the rest

PYTHON=${PYTHON:-python3}
if [ -x ../../.venv/bin/python ]; then PYTHON=../../.venv/bin/python; fi

mkdir -p deps
have() { compgen -G "deps/$1" >/dev/null; }

# Source distributions. pip reads their metadata by running setup.py, which imports torch (hence
# no build isolation: an isolated build would install torch first) and, unless told to skip the
# CUDA build, looks for nvcc; the *_SKIP_CUDA_BUILD variables make that a metadata-only run.
if ! have "mamba_ssm-*.tar.gz" || ! have "causal_conv1d-*.tar.gz"; then
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
        -d deps "$MAMBA_SSM" "$CAUSAL_CONV1D"
fi

# A wheel for the GPU machine's Python (3.12, x86-64), whatever this machine runs.
if ! have "decord-*.whl"; then
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2010_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d deps "$DECORD"
fi

ls -l deps
total_kib=$(du -sk deps | cut -f1)
echo "deps: $((total_kib / 1024)) MiB ($total_kib KiB); limit ${LIMIT_MIB} MiB"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "fetch_deps: deps/ is over ${LIMIT_MIB} MiB; it would not travel with the working tree" >&2
    exit 1
fi
