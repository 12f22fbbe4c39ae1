"""Checks that every store transaction runs just before it commits (``cicm.store.core.Store.transaction``).

A check that raises rolls the transaction back. ``cicm.clikit.interruptible`` registers one: after SIGTERM/SIGINT
nothing commits, even when a C extension (DuckDB, mid-query) turned the signal's exception into an ordinary error
that a fallback swallowed. A module of its own, below both the CLI kit and the store in the layers.
"""
from __future__ import annotations

from typing import Callable

COMMIT_CHECKS: list[Callable[[], None]] = []
