"""The bundled datasets ship inside the wheel, so a non-editable install runs the demo (issue 18, item 6).

Builds the wheel (`pip wheel . --no-deps`), checks its listing, installs it with `pip install --no-deps --target`
and, from a folder outside the checkout, imports cicm from there (this venv's packages resolve the dependencies)
and reads every runtime dataset through cicm.paths.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "cicm" / "demo" / "data"

# What the planner and the demo read at run time (cicm.paths.bundled_data_dir() / these), plus the licences.
RUNTIME_FILES = sorted(
    str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.suffix in (".csv", ".gz", ".toml", ".md")
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools builds in the source tree (build/, *.egg-info), and a stale build/lib would
    # leak moved modules into the wheel.
    src, out = tmp_path_factory.mktemp("src") / "cicm-src", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "dist", "test-artifacts", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    (built,) = out.glob("cicm-*.whl")
    return built


def test_the_runtime_data_is_bundled() -> None:
    # The datasets the readers open: carbon (planner, ecovisor), SPECpower (config), load traces (demo), the fleet.
    for needed in ("demo_fleet.toml", "SOURCES.md", "server_power", "carbon_intensity", "carbon_forecast",
                   "datacenter_load"):
        assert any(f.split("/")[0] == needed for f in RUNTIME_FILES), needed
    assert len(RUNTIME_FILES) >= 17


def test_the_wheel_holds_the_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in RUNTIME_FILES if f"cicm/demo/data/{f}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "cicm/demo/traces.py" in names and "flows/nightly.py" in names
    assert wheel.stat().st_size < 8_000_000, f"the wheel is {wheel.stat().st_size:,} bytes"


def test_an_installed_wheel_finds_its_data(wheel: Path, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True, timeout=120)
    code = f"""
import sys
from pathlib import Path
import cicm
assert Path(cicm.__file__).resolve().is_relative_to({str(target.resolve())!r}), cicm.__file__
from cicm.paths import bundled_data_dir, home_dir
data = bundled_data_dir()
assert data.resolve().is_relative_to({str(target.resolve())!r}), data
missing = [f for f in {RUNTIME_FILES!r} if not (data / f).is_file()]
assert not missing, missing
assert home_dir() == Path({str(tmp_path / "home")!r})
import os
del os.environ["CICM_HOME"]
os.environ["XDG_DATA_HOME"] = {str(tmp_path / "xdg")!r}
assert home_dir() == Path({str(tmp_path / "xdg")!r}) / "cicm", home_dir()  # not site-packages/var
from cicm.config import default_fleet_path, load_fleet, specpower_table
fleet = load_fleet(default_fleet_path())
assert fleet.clusters() and len(specpower_table()) == 619
from cicm.demo.traces import batch_jobs, inflexible_profile
assert len(inflexible_profile("google2019")) % 168 == 0 and len(batch_jobs("pai")) > 0
print("ok", len(fleet.clusters()))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CICM_DATA_DIR", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), CICM_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
