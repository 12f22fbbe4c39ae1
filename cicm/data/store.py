"""Moved to ``cicm.store`` (``cicm.store.core``); kept importable for existing callers.

This name is an alias of ``cicm.store.core`` (the same module object), so patching a setting here, e.g.
``LOCK_RETRY_SECONDS``, patches the store itself.
"""
from __future__ import annotations

import sys

from cicm.store import core as _core
from cicm.store.core import (LOCK_RETRY_SECONDS, SCHEMA_V1, SCHEMA_VERSION, TABLE_KEYS, RunRecord,  # noqa: F401
                             Store, code_version, new_run_id)

sys.modules[__name__] = _core
