"""scripts/setup.sh: each clone gets its own .venv over the shared dependency cache, and imports its
own code (issue 17 case 15, docs/reliability.md).

The clones reuse the dependency cache this test session runs on (CI builds it with setup.sh before
running pytest); the test skips, saying why, where that cache is not built, rather than spend
minutes building one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

MARKER = "MS-Temba pipeline tools"
CHANGED = "MS-Temba pipeline tools of clone B"


def setup_environment() -> dict[str, str]:
    """The environment for setup.sh: the dependency cache, extras and interpreter of this session's
    own environment (from its setup stamp; an older, linked .venv is the cache venv itself), and no
    building of a missing cache."""
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env.update(MS_TEMBA_SETUP_NO_BUILD="1", MS_TEMBA_PYTHON=sys.executable)
    stamp = Path(sys.prefix, "ms-temba-setup")
    if stamp.is_file():
        values = dict(line.split("=", 1) for line in stamp.read_text().splitlines() if "=" in line)
        env.update(MS_TEMBA_VENV_CACHE=str(Path(values["deps"]).parent), MS_TEMBA_EXTRAS=values["extras"])
    elif Path(sys.prefix, ".ready").is_file():
        env["MS_TEMBA_VENV_CACHE"] = str(Path(sys.prefix).resolve().parent)
    return env


def run(command, cwd, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def git(cwd, *args):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd)


def setup(clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = run(["bash", "scripts/setup.sh"], clone, env, check=False)
    if done.returncode == 3:
        pytest.skip(f"the dependency cache is not built ({done.stderr.strip()}); run scripts/setup.sh first")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def in_clone(clone: Path, *args, shell: str | None = None) -> str:
    """stdout of a command of clone's .venv run from / (nothing of the clone on the path but its .venv)."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    command = ["bash", "-c", shell] if shell else [str(clone / ".venv" / "bin" / args[0]), *args[1:]]
    return run(command, "/", env).stdout


WHERE = "import ms_temba, extractors, pipelines; print(ms_temba.__file__, extractors.__file__, pipelines.__file__)"


def test_two_clones_each_run_their_own_code(tmp_path):
    env = setup_environment()
    # Clone A: the project as it is in this working tree, committed. Clone B: a clone of A with a
    # harmless committed change that both imports and the ms-temba command show.
    a, b = tmp_path / "clone_a", tmp_path / "clone_b"
    tracked = run(["git", "ls-files", "-z"], PROJECT_ROOT).stdout
    for name in filter(None, tracked.split("\0")):
        if (PROJECT_ROOT / name).is_file():
            (a / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, a / name)
    git(a, "init", "-q")
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "clone A")
    git(tmp_path, "clone", "-q", str(a), str(b))
    cli = b / "pipelines" / "tools" / "cli.py"
    assert MARKER in cli.read_text()
    cli.write_text(cli.read_text().replace(MARKER, CHANGED))
    git(b, "commit", "-q", "-am", "clone B: another description")

    setup(a, env)
    # B was set up by an older setup.sh: its .venv is a link to the shared cache. It is replaced.
    deps = Path((a / ".venv" / "ms-temba-setup").read_text().split("deps=")[1].split("\n")[0])
    (b / ".venv").symlink_to(deps)
    assert "replacing the link" in setup(b, env).stdout

    for clone in (a, b):
        venv = clone / ".venv"
        assert venv.is_dir() and not venv.is_symlink()
        paths = in_clone(clone, "python", "-c", WHERE).split()
        assert all(path.startswith(f"{clone}/") for path in paths), (clone, paths)
        # The commands the README uses: their shebang is the clone's python.
        for command in ("ms-temba", "dvc", "ray", "pytest", "pip"):
            assert (venv / "bin" / command).read_text().splitlines()[0] == f"#!{venv}/bin/python", command
        # DVC stages run `python -m pipelines.stages.<stage>` through PATH: after activate, the clone's.
        activated = in_clone(clone, shell=f". {venv}/bin/activate && python -c '{WHERE}'").split()
        assert all(path.startswith(f"{clone}/") for path in activated), (clone, activated)
    help_a, help_b = in_clone(a, "ms-temba", "--help"), in_clone(b, "ms-temba", "--help")
    assert MARKER in help_a and CHANGED not in help_a
    assert CHANGED in help_b
    assert in_clone(b, "dvc", "--version").strip()

    # Ray workers start the driver's interpreter: they import the driver's clone too.
    worker = in_clone(b, "python", "-c", (
        "import ray\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def where():\n"
        "    import sys, pipelines\n"
        "    return sys.executable + ' ' + pipelines.__file__\n"
        "print(ray.get(where.remote()))\n"
        "ray.shutdown()\n"))
    assert worker.split()[-2:] == [f"{b}/.venv/bin/python", f"{b}/pipelines/__init__.py"], worker

    # Nothing of either clone went into the shared cache.
    deps_site = next(deps.glob("lib/python*/site-packages"))
    for pth in deps_site.glob("*.pth"):
        assert str(a) not in pth.read_text() and str(b) not in pth.read_text(), pth

    # A rerun reuses the environment, in seconds.
    python = (a / ".venv" / "bin" / "python").lstat().st_ino
    started = time.monotonic()
    assert "ready" in setup(a, env).stdout
    assert time.monotonic() - started < 10
    assert (a / ".venv" / "bin" / "python").lstat().st_ino == python
    assert in_clone(a, "python", "-c", WHERE).split()[2] == f"{a}/pipelines/__init__.py"
