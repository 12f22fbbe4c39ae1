"""Where the bundled data and the default store live.

The bundled datasets sit in the repository's top-level ``data/`` folder (see data/SOURCES.md).
``CICM_DATA_DIR`` overrides it; ``CICM_HOME`` overrides where the store and Prefect's home go.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def bundled_data_dir() -> Path:
    return Path(os.environ.get("CICM_DATA_DIR", REPO_ROOT / "data"))


def home_dir() -> Path:
    return Path(os.environ.get("CICM_HOME", REPO_ROOT / "var"))


def default_db_path() -> Path:
    return home_dir() / "cicm.duckdb"
