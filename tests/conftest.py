import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore the same examples on every run, so CI cannot go red on a lucky draw; set
# HYPOTHESIS_PROFILE=explore to search fresh examples locally.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Prefect and the store write under CICM_HOME; keep test runs out of the repository's var/.
os.environ.setdefault("CICM_HOME", tempfile.mkdtemp(prefix="cicm-test-home-"))

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "cicm.duckdb"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
