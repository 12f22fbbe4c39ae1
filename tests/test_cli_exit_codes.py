"""One exit-code table for every command (cicm/clikit.py, README): 0 ok, 1 bad input, 2 degraded. Run as a user
runs them: the console script in a subprocess, the error as one line on stderr, nothing on stdout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cicm.clikit import ExitCode

CICM = Path(sys.executable).with_name("cicm")


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CICM_ECOVISOR_ADMIN_TOKEN", "CICM_ECOVISOR_TOKEN")}
    environ.update(CICM_HOME=str(tmp_path / "home"), **env)
    return subprocess.run([str(CICM), *args], capture_output=True, text=True, timeout=120, env=environ,
                          cwd=tmp_path)


@pytest.mark.parametrize("args, field", [
    (["plan", "--date", "2022-13-45"], "date"),
    (["plan", "--program", "fastest"], "program"),
    (["carbon", "fetch", "--zone", "CISO", "--provider", "nope", "--date", "2022-06-15"], "provider"),
    (["slo", "status", "--db", "missing.duckdb"], "db"),
    (["agent", "run", "--cluster", "sj-a", "--ecovisor", "http://127.0.0.1:9", "--once"], "CICM_ECOVISOR_TOKEN"),
    (["ecovisor", "serve", "--site", "site.toml"], "CICM_ECOVISOR_ADMIN_TOKEN"),
    (["store", "compact", "--db", "missing.duckdb", "--before", "2022-01-01", "--archive", "a"], "db"),
    (["plan", "--no-such-flag"], "No such option"),  # a usage error is bad input too (Click's own 2 is not)
])
def test_bad_input_exits_1_with_one_error_line_on_stderr(args, field, tmp_path):
    (tmp_path / "site.toml").write_text("")  # exists, so the ecovisor reaches its token check
    out = run(args, tmp_path)
    assert out.returncode == ExitCode.BAD_INPUT, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "", out.stdout
    if field == "No such option":
        assert field in out.stderr
        return
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and field in errors[0], out.stderr[-2000:]
