"""The ecovisor's errors, one per HTTP status that ``app.py`` maps them to (InputError -> 422 and BackendError
-> 503 live in :mod:`cicm.errors` and :mod:`.backends.base`)."""
from __future__ import annotations


class AuthError(Exception):
    """Missing or unknown bearer token (401)."""


class ForbiddenError(Exception):
    """A valid token without the right: an app's token on an admin route (403)."""


class NotFoundError(Exception):
    """No such thing for this caller (404). An app asking for another app's container gets the very answer it
    gets for a container that does not exist, so no container name leaks across apps."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ConflictError(Exception):
    """The request conflicts with the current state (409)."""


__all__ = ["AuthError", "ForbiddenError", "NotFoundError", "ConflictError"]
