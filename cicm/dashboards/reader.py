"""Moved to ``cicm.store.reader`` (read-only access to the store for the dashboard); re-exported here."""
from __future__ import annotations

from cicm.store.reader import (Reading, StoreBusy, StoreIncompatible, StoreMissing, StoreReader,  # noqa: F401
                               _holder, _is_lock_error, _remove_quietly)

__all__ = ["Reading", "StoreBusy", "StoreIncompatible", "StoreMissing", "StoreReader"]
