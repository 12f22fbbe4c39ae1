"""What is wrong with a store file the agent could not read: missing, corrupt, locked, or otherwise unreadable.

The agent never holds the store open; it opens it at each pass. Only a *locked* store (the nightly plan is
writing it) is a reason to keep enforcing the plan read before: the lock goes away when the writer commits. A
store that was deleted, or whose bytes are not a DuckDB database (overwritten, truncated, a block whose checksum
does not match), will not come back by itself, so the agent lifts its caps (as for a missing plan) and says
which it is. ``Store`` wraps every DuckDB connect error that is not a lock in the text "is locked by another
process"; this module reads the original error under that wrapper, so a corrupt file is reported as corrupt.
"""
from __future__ import annotations

from pathlib import Path

MISSING, CORRUPT, LOCKED, UNREADABLE = "missing", "corrupt", "locked", "unreadable"
KINDS = (MISSING, CORRUPT, LOCKED, UNREADABLE)

# DuckDB's own texts (1.x-2.x): a file that is not a database, a block whose checksum fails, a truncated file.
_CORRUPT_TEXTS = ("not a valid duckdb database", "corrupt database", "checksum", "could not read enough bytes",
                  "serialization error", "invalid database header", "unsupported database version",
                  "failed to read database header")
_LOCK_TEXTS = ("could not set lock", "conflicting lock", "database is locked", "lock on file")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def classify(exc: BaseException, path: Path | str) -> tuple[str, str]:
    """(kind, message) for an error reading the store at ``path``; kind is one of :data:`KINDS`. The message
    names the file and the underlying error (the innermost one, not the "locked by another process" wrapper)."""
    path = Path(path)
    chain = _chain(exc)
    root = chain[-1]
    texts = [str(e) for e in chain]
    for name in {str(path), str(path.absolute())}:  # the file's own name may hold any word ("checksum", "lock")
        texts = [t.replace(name, "<store>") for t in texts]
    texts = [t.lower() for t in texts]
    if not path.exists():
        return MISSING, f"store {path} is missing (deleted or moved): no database file there"
    if any(t in text for text in texts for t in _CORRUPT_TEXTS):
        return CORRUPT, (f"store {path} is corrupt, not locked: {_first_line(root)} "
                         "(restore it from a backup or re-create it; the agent will not cap from memory)")
    if any(t in text for text in texts for t in _LOCK_TEXTS):
        return LOCKED, f"store {path} is locked by another process: {_first_line(root)}"
    if path.is_dir():
        return CORRUPT, f"store {path} is a directory, not a DuckDB database file"
    return UNREADABLE, f"store {path} is unreadable: {_first_line(root)}"


__all__ = ["CORRUPT", "KINDS", "LOCKED", "MISSING", "UNREADABLE", "classify"]
