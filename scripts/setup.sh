#!/usr/bin/env bash
# Set up (or reuse) this clone's virtualenv, ./.venv, on top of a shared cache of the dependencies.
#
# The dependencies are large (torch alone is several GB), so they live outside the clone in a cached
# virtualenv keyed on the dependency spec: a fresh clone with an unchanged pyproject.toml reuses it,
# and any change to the dependencies builds a new one. The cache holds the dependencies only, never
# the project. Each clone gets its own small environment, ./.venv (a real virtualenv of the same
# interpreter): a .pth hook puts the cache's site-packages on its path, the project is installed
# into it editable and without dependencies, and the dependencies' commands (dvc, ray, pytest, pip,
# ...) are copied into .venv/bin with this clone's python in their shebang. So `.venv/bin/python`,
# `ms-temba`, `dvc repro`, Ray workers and DVC stages of one clone always run that clone's code,
# whatever other clones on the machine do (docs/reliability.md, case 15). A rerun takes seconds.
#
#   MS_TEMBA_VENV_CACHE     where the cached environments live (default: ~/.cache/ms-temba)
#   MS_TEMBA_PYTHON         the interpreter to build them with (default: python3.11, else python3)
#   MS_TEMBA_EXTRAS         extras to install (default: test; add "cuda" on a GPU machine, see README)
#   MS_TEMBA_SETUP_NO_BUILD =1: exit with status 3 instead of building a missing cache (the tests use it)
set -euo pipefail

# pip of environment $1, with its output kept in a log that is shown only when it fails.
pip_quiet() {
    local env=$1 log
    shift
    log=$(mktemp)
    if ! "$env/bin/python" -m pip "$@" >"$log" 2>&1; then
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
dist=ms-temba  # [project] name in pyproject.toml
dist_module=${dist//-/_}

py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$( { cat "$repo/pyproject.toml"; echo "$py_version $extras"; } | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
local_venv="$repo/.venv"
stamp="$local_venv/ms-temba-setup"
mkdir -p "$cache"

# One setup at a time per cache (CI and a developer may share a machine).
exec 9>"$cache/.lock"
flock 9

# 1. The shared cache: the dependencies, built once per dependency spec.
if [ ! -f "$venv/.ready" ]; then
    if [ "${MS_TEMBA_SETUP_NO_BUILD:-0}" = 1 ]; then
        echo "setup: $venv (python $py_version, extras: $extras) is not built, and MS_TEMBA_SETUP_NO_BUILD=1" >&2
        exit 3
    fi
    echo "setup: building $venv (python $py_version, extras: $extras); this takes a few minutes once"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    pip_quiet "$venv" install --upgrade "pip>=24" "setuptools>=68" wheel
    if [[ ",$extras," == *",cuda,"* ]]; then
        # mamba-ssm and causal-conv1d compile CUDA kernels against the installed torch.
        pip_quiet "$venv" install "torch==2.14.1" "torchvision==0.29.1"
        export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
    fi
    # The project's dependencies (installing it editable pulls them in; --no-build-isolation lets the
    # CUDA extras build against the torch already installed), then the project itself is taken out
    # again: the cache is shared by every clone, the project belongs to each clone's own .venv.
    pip_quiet "$venv" install --no-build-isolation -e "$repo[$extras]"
    pip_quiet "$venv" uninstall -y "$dist"
    "$venv/bin/python" -c "import torch, decord, ray, pyarrow, timm, hydra, dvc, setuptools" \
        || { echo "setup: the environment in $venv is incomplete" >&2; exit 1; }
    echo "python=$py_version extras=$extras" >"$venv/.ready"
fi
deps_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# 2. This clone's own environment. Reused when its stamp says it was made by this script for this
#    clone and this cache (and it still imports this clone's code), else made afresh.
wanted="key=$key
deps=$venv
repo=$repo
python=$py_version
extras=$extras"
reuse=0
if [ ! -L "$local_venv" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
    && [ -x "$local_venv/bin/python" ] && [ -x "$local_venv/bin/$dist" ]; then
    reuse=1
fi
if [ "$reuse" = 0 ]; then
    if [ -L "$local_venv" ]; then
        echo "setup: replacing the link $local_venv -> $(readlink "$local_venv") (an older setup) by this clone's own environment"
        rm "$local_venv"
    elif [ -e "$local_venv" ]; then
        echo "setup: remaking $local_venv (made for another cache key, clone path or setup)"
        rm -rf "$local_venv"
    fi
    # pip comes from the cache, through the hook below: no ensurepip, no second pip to keep up to date.
    "$venv/bin/python" -m venv --without-pip "$local_venv"
fi
local_site=$("$local_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# The hook (rewritten on every run: it is the one place that names the cache). Like site.addsitedir
# on the cache's site-packages, so that the .pth files of the dependencies there are processed too,
# but skipping any install of the project itself that an older setup.sh left in the cache.
cat >"$local_site/_ms_temba_deps.py" <<EOF
"""Written by scripts/setup.sh: puts the shared dependency cache on this environment's path."""
import os
import site
import sys

DEPS = "$deps_site"
PROJECT_PTH_PREFIX = "__editable__.$dist_module-"


def add_dependencies():
    known = {os.path.normcase(os.path.abspath(path)) for path in sys.path if path}
    if os.path.normcase(DEPS) in known or not os.path.isdir(DEPS):
        return
    sys.path.append(DEPS)
    known.add(os.path.normcase(DEPS))
    for name in sorted(os.listdir(DEPS)):
        if name.endswith(".pth") and not name.startswith(PROJECT_PTH_PREFIX):
            site.addpackage(DEPS, name, known)


add_dependencies()
EOF
# Sorted after the project's own __editable__ .pth: this clone's code comes first on sys.path.
echo "import _ms_temba_deps" >"$local_site/ms_temba_deps.pth"

# The dependencies' commands, with this clone's python in their shebang (a binary is linked).
"$local_venv/bin/python" - "$venv/bin" "$local_venv/bin" "$dist" <<'EOF'
import os
import sys

source, target, project = sys.argv[1:]
cached_python = os.path.join(source, "python")
own_python = os.path.join(target, "python")
for name in sorted(os.listdir(source)):
    path = os.path.join(source, name)
    if (name.startswith(("python", "activate", "Activate")) or name == project or not os.path.isfile(path)
            or not os.access(path, os.X_OK)):
        continue
    destination = os.path.join(target, name)
    with open(path, "rb") as handle:
        content = handle.read()
    if os.path.lexists(destination):
        os.remove(destination)
    if content.startswith(b"#!") and cached_python.encode() in content[:512]:
        # `#!/cache/bin/python`, or pip's `#!/bin/sh` + `'''exec' "/cache/bin/python" ...` for long paths
        lines = content.split(b"\n", 2)
        for index in range(min(2, len(lines))):
            lines[index] = lines[index].replace(cached_python.encode(), own_python.encode())
        with open(destination, "wb") as handle:
            handle.write(b"\n".join(lines))
        os.chmod(destination, 0o755)
    else:
        os.symlink(path, destination)
EOF

if [ "$reuse" = 0 ]; then
    # The project, editable, into this clone's environment only (setuptools comes from the cache).
    pip_quiet "$local_venv" install --no-deps --no-build-isolation --config-settings editable_mode=compat -e "$repo"
fi

# The check that matters: from a neutral directory, this environment imports this clone's code
# and finds the dependencies (find_spec: nothing is imported).
if ! (cd / && "$local_venv/bin/python" - "$repo" <<'EOF'
import importlib.util
import os
import sys

repo = sys.argv[1]
for name in ("ms_temba", "extractors", "pipelines"):
    spec = importlib.util.find_spec(name)
    origin = spec and spec.origin and os.path.realpath(spec.origin)
    if not origin or not origin.startswith(os.path.realpath(repo) + os.sep):
        sys.exit(f"setup: {name} is imported from {origin}, not from {repo}")
for name in ("torch", "ray", "dvc", "pyarrow", "pip", "setuptools"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f"setup: {name} is not importable")
EOF
); then
    rm -f "$stamp"  # the next run makes the environment afresh
    exit 1
fi
echo "$wanted" >"$stamp"
echo "setup: ready, $local_venv (this clone's code; dependencies from $venv)"
