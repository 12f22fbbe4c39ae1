"""Where the bundled data and the default store live.

The bundled datasets are package data: they sit in ``cicm/demo/data/`` (sources and licences in its
``SOURCES.md``) and ship inside the wheel, so a non-editable install finds them through ``importlib.resources``.
``CICM_DATA_DIR`` overrides it; ``CICM_HOME`` overrides where the store and Prefect's home go.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The bundled datasets, relative to the cicm package (package data, listed in pyproject.toml).
BUNDLED_DATA = ("demo", "data")


def bundled_data_dir() -> Path:
    override = os.environ.get("CICM_DATA_DIR")
    if override is not None:
        return Path(override)
    # Anchored on the top package (not cicm.demo) so this bottom layer imports nothing above it.
    root = files("cicm").joinpath(*BUNDLED_DATA)
    if not isinstance(root, Path):  # a zip import: the readers need real files
        raise RuntimeError(f"cicm's bundled data is not on the file system ({root}); install cicm unzipped")
    return root


def _source_checkout() -> bool:
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "cicm" / "paths.py").is_file()


def home_dir() -> Path:
    """``$CICM_HOME``; else ``var/`` in a source checkout, or ``$XDG_DATA_HOME/cicm`` (``~/.local/share/cicm``)
    for an installed package, whose parent folder is site-packages."""
    env = os.environ.get("CICM_HOME")
    if env is not None:
        return Path(env)
    if _source_checkout():
        return REPO_ROOT / "var"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "cicm"


def default_db_path() -> Path:
    return home_dir() / "cicm.duckdb"
