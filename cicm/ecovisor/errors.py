"""The ecovisor's errors, one per HTTP status that ``app.py`` maps them to (InputError -> 422 and BackendError
-> 503 live in :mod:`cicm.errors` and :mod:`.backends.base`)."""
from __future__ import annotations


class AuthError(Exception):
    """Missing or unknown bearer token (401)."""


class ForbiddenError(Exception):
    """The app asked for a container it does not own (403)."""


class ConflictError(Exception):
    """The request conflicts with the current state (409)."""


__all__ = ["AuthError", "ForbiddenError", "ConflictError"]
