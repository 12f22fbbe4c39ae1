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


# ------------------------------------------------------------------------------------------------ test speed
# `pytest -m "not slow"` is the fast inner loop; `.ci/run` (scripts/test) runs everything. Tests are marked here,
# centrally, by what they need rather than in each file:
#   - a fixture that starts something heavy (by name, including fixtures the test needs through other fixtures);
#   - a module that is all about such a resource (by file name);
#   - a test body that runs the CLI in a subprocess (the `cicm` console script or `python -m cicm....`), or
#     starts Dask or a Prefect server itself.
SLOW_FIXTURES = {
    "prefect_server": "a Prefect server (prefect_test_harness)",
    "prefect_api": "a Prefect server (prefect_test_harness)",
    "browser": "a headless chromium driven by Playwright",
    "page": "a headless chromium driven by Playwright",
    "lxd": "a real LXD",
    "slurm": "a Slurm cluster",
}
SLOW_MODULES = {  # fnmatch patterns on the test file's name
    "test_*slurm*.py": "a Slurm cluster",
}
SLOW_SOURCE = {  # substrings of a test function's own source
    'with_name("cicm")': "the cicm console script in a subprocess",
    '"-m", "cicm.': "a cicm CLI in a subprocess",
    "LocalCluster(": "a local Dask cluster",
    "prefect_test_harness": "a Prefect server (prefect_test_harness)",
    "sync_playwright": "a headless browser",
}


def _slow_reason(item: pytest.Item) -> str | None:
    import fnmatch
    import inspect

    for name in getattr(item, "fixturenames", ()):
        if name in SLOW_FIXTURES:
            return f"needs {SLOW_FIXTURES[name]} (fixture {name})"
    for pattern, why in SLOW_MODULES.items():
        if fnmatch.fnmatch(item.path.name, pattern):
            return f"needs {why} (module {item.path.name})"
    function = getattr(item, "function", None)
    if function is not None:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            source = ""
        for needle, why in SLOW_SOURCE.items():
            if needle in source:
                return f"runs {why}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = _slow_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.slow(reason=reason))
