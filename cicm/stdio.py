"""Clean machine-readable stdout for the CLI's ``--json`` commands."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Send everything written to file descriptor 1 (Python's and C libraries', e.g. the HiGHS banner) to stderr,
    so that ``--json`` leaves stdout holding the JSON document alone."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
