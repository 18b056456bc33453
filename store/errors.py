"""The error hierarchy of fimio.

Every error fimio raises on purpose is a :class:`FimioError`. Each class carries its
exit code (the contract's table) and an optional hint; only ``fimio.cli`` turns them
into the one-line ``fimio: error: <what> (<hint>)`` message and the process exit code.
"""

from __future__ import annotations


class FimioError(Exception):
    """Base class. ``exit_code`` follows the contract; ``hint`` says what to do next."""

    exit_code = 2
    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details = details or []  # extra lines (e.g. each missing item), shown before the error

    def __str__(self) -> str:
        return self.message

    @property
    def line(self) -> str:
        """The message with its hint, as the error line shows them (and a list of several
        errors, each with what to do about it)."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(FimioError):
    """Bad usage or bad input: an invalid derivation, flag, name, URL or file (exit 2)."""

    exit_code = 2


class BuildError(FimioError):
    """A builder failed, timed out or produced no output (exit 1)."""

    exit_code = 1


class NotReproducible(FimioError):
    """A rebuild (``--check``) produced different bytes (exit 3)."""

    exit_code = 3


class IntegrityError(FimioError):
    """A hash or signature mismatch, a corrupt or hostile object (exit 4)."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None = None, *, expected=None, got=None):
        super().__init__(message, hint)
        self.expected = expected
        self.got = got


class NotFound(FimioError):
    """A path, derivation or object that is missing or cannot be obtained (exit 5)."""

    exit_code = 5


class RemoteError(FimioError):
    """A remote cache is unreachable or refused the request (exit 6)."""

    exit_code = 6
