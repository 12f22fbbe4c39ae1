"""The systemd units in deploy/systemd/ (issue 17, item 7): each passes `systemd-analyze verify` (with the
install path pointed at this checkout's console script), and every flag its ExecStart passes is one the command
really takes (read from its --help through the console script)."""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
CICM = Path(sys.executable).with_name("cicm")
INSTALLED = "/opt/cicm/.venv/bin/cicm"


def exec_start(unit: Path) -> list[str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # keep the keys' case
    parser.read(unit)
    return shlex.split(parser["Service"]["ExecStart"])


def test_there_is_a_unit_for_each_long_running_part():
    assert [u.name for u in UNITS] == ["cicm-agent@.service", "cicm-ecovisor.service", "cicm-nightly.service"]
    for unit in UNITS:
        assert exec_start(unit)[0] == INSTALLED


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit, tmp_path):
    name = unit.name.replace("@.service", "@sj-a.service")  # a template is verified as one of its instances
    local = tmp_path / name
    local.write_text(unit.read_text().replace(INSTALLED, str(CICM)))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_every_flag_is_one_the_command_takes(unit):
    argv = exec_start(unit)[1:]
    words = [a for a in argv if not a.startswith("-")]
    command = words[:2] if words[0] in ("ecovisor", "agent") else words[:1]
    helped = subprocess.run([str(CICM), *command, "--help"], capture_output=True, text=True, timeout=60,
                            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert helped.returncode == 0, helped.stderr
    known = set(re.findall(r"--[a-z][a-z0-9-]*", helped.stdout))
    flags = [a for a in argv if a.startswith("--")]
    assert flags and not [f for f in flags if f not in known], (command, flags, sorted(known))
