"""The client's errors: each one line for a person, with the exit status the CLI gives it.

`ClientError.exit_code` is 1 for what the servers refused or could not do (not found, no right,
unavailable) and 2 for a request the caller should change (bad usage, a missing extra). The CLI
prints `error: <message>` and exits with it; Python callers catch the class they care about.
"""

from __future__ import annotations


class ClientError(Exception):
    """Something the client could not do; `str()` is the one line to show."""

    exit_code = 1


class UsageError(ClientError):
    """The request itself must change (a bad flag value, a parameter the API refused: 400)."""

    exit_code = 2


class MissingExtra(UsageError):
    """An optional package is not installed; the message names the extra that brings it."""

    def __init__(self, what: str, module: str, extra: str = "notebook") -> None:
        super().__init__(
            f"{what} needs {module}, which is not installed: pip install 'mljob-operator[{extra}]'"
        )
        self.module = module
        self.extra = extra


class NotFound(ClientError):
    """No such MLJob (or Service, ConfigMap) where it was looked for."""


class Unauthorized(ClientError):
    """The credentials were not accepted (401): none sent, expired, or another cluster's."""


class Forbidden(ClientError):
    """The credentials are valid but RBAC does not allow this (403)."""


class Conflict(ClientError):
    """The object already exists, or changed under us (409)."""


class Unavailable(ClientError):
    """A server could not be reached or could not answer now (connection refused, 429, 503)."""


class Interrupted(ClientError):
    """A streamed answer ended before its end (the connection broke midway): nothing is whole."""


def require(module: str, what: str, extra: str = "notebook") -> object:
    """The optional module `module`, imported; MissingExtra naming `extra` when it is absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(what, module, extra) from None
