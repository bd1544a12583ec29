"""The `ms-temba` console script: every subcommand is reachable and hands its arguments on."""
import subprocess
import sys

import pytest

from pipelines.tools import cli


@pytest.mark.parametrize("command, prog", [
    ("predict", "ms-temba predict"),
    ("convert-release", "ms-temba convert-release"),
    ("export-mstct", "ms-temba export-mstct"),
    ("compose", "ms-temba compose"),
    ("import-npy", "ms-temba import-npy"),
])
def test_every_subcommand_has_its_own_help(command, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: {prog}" in capsys.readouterr().out


def test_delegated_command_returns_its_exit_code(tmp_path):
    # A missing checkpoint is a usage error of `predict` (exit code 2), reported on stderr.
    done = subprocess.run([sys.executable, "-m", "pipelines.tools.cli", "predict", str(tmp_path),
                           "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "missing.pt" in done.stderr


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
