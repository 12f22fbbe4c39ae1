"""Errors shared by every part. Bad input never becomes a number silently: it raises one of these."""


class InputError(ValueError):
    """Rejected input. `field` names the offending field, column or parameter."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    # picklable across process pools (bench workers, Prefect)
    def __reduce__(self) -> "tuple[type[InputError], tuple[str, str]]":
        return (type(self), (self.field, self.message))


class ProviderError(RuntimeError):
    """A remote data provider failed (HTTP error, timeout, retries exhausted)."""

    def __init__(self, provider: str, message: str, status_code: int | None = None):
        self.provider = provider
        self.status_code = status_code
        self.message = message
        super().__init__(f"{provider}: {message}" + (f" (HTTP {status_code})" if status_code else ""))

    def __reduce__(self) -> "tuple[type[ProviderError], tuple[str, str, int | None]]":
        return (type(self), (self.provider, self.message, self.status_code))
