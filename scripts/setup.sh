#!/usr/bin/env bash
# Set up (or reuse) the project's virtualenv and link it as ./.venv.
#
# The environment is large (torch alone is several GB), so it lives outside the clone in a cache
# keyed on the dependency spec: a fresh clone with an unchanged pyproject.toml reuses it in seconds,
# and any change to the dependencies builds a new one. Only the project itself is (re)installed,
# editable and without dependencies, on every run, so the venv always points at this clone.
#
#   MS_TEMBA_VENV_CACHE  where the cached environments live (default: ~/.cache/ms-temba)
#   MS_TEMBA_PYTHON      the interpreter to build them with (default: python3.11, else python3)
#   MS_TEMBA_EXTRAS      extras to install (default: test; add "cuda" on a GPU machine, see README)
set -euo pipefail

# pip, with its output kept in a log that is shown only when it fails.
pip_quiet() {
    local log
    log=$(mktemp)
    if ! "$venv/bin/python" -m pip "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2
        rm -f "$log"
        echo "setup: pip $* failed" >&2
        exit 1
    fi
    rm -f "$log"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MS_TEMBA_VENV_CACHE:-$HOME/.cache/ms-temba}
python=${MS_TEMBA_PYTHON:-$(command -v python3.11 || command -v python3)}
extras=${MS_TEMBA_EXTRAS:-test}

py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$( { cat "$repo/pyproject.toml"; echo "$py_version $extras"; } | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
mkdir -p "$cache"

# One setup at a time per cache (CI and a developer may share a machine).
exec 9>"$cache/.lock"
flock 9

if [ ! -f "$venv/.ready" ]; then
    echo "setup: building $venv (python $py_version, extras: $extras); this takes a few minutes once"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    pip_quiet install --upgrade "pip>=24" "setuptools>=68" wheel
    if [[ ",$extras," == *",cuda,"* ]]; then
        # mamba-ssm and causal-conv1d compile CUDA kernels against the installed torch.
        pip_quiet install "torch==2.14.1" "torchvision==0.29.1"
        export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
    fi
    # The project's dependencies (installing it editable pulls them in); --no-build-isolation lets the
    # CUDA extras build against the torch already installed.
    pip_quiet install --no-build-isolation -e "$repo[$extras]"
    "$venv/bin/python" -c "import torch, decord, ray, pyarrow, timm, hydra, dvc" \
        || { echo "setup: the environment in $venv is incomplete" >&2; exit 1; }
    touch "$venv/.ready"
fi

# Point the (possibly shared) environment at this clone.
pip_quiet install --no-deps --no-build-isolation --config-settings editable_mode=compat -e "$repo"
ln -sfn "$venv" "$repo/.venv"
echo "setup: ready, $repo/.venv -> $venv"
