"""What the engine's parts raise to each other and to the FUSE adapter."""

from __future__ import annotations

import errno


class CacheFull(Exception):
    """No room in the cache for a fetch, even after evicting what may be evicted.
    Readers then get their bytes straight from the source (read-through)."""


class VersionReplaced(Exception):
    """The file changed in the source; the version being worked on is no longer served."""


class ReadError(Exception):
    """A read cannot be answered; errno is what the reader gets."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def error_kind(error: BaseException) -> str:
    """How a failure is counted in the metrics: its errno's name, else its type's."""
    if isinstance(error, OSError) and error.errno is not None:
        return errno.errorcode.get(error.errno, "OSError")
    return type(error).__name__
