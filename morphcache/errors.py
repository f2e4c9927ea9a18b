"""User-facing errors.

Every validation failure the user can cause (a wrong path, a corrupt image under ``--on-bad-image fail``, a store
of another schema version, a mismatched spec) raises a :class:`MorphcacheError` whose message is one line naming
the file or value and what to do. The CLI prints it as ``morphcache: error: <message>`` and exits with code 2.
Library code never uses ``assert`` for validation.
"""

from __future__ import annotations

import re

_REPORTED = re.compile(r"morphcache\.errors\.(\w+): ")


class MorphcacheError(Exception):
    """A problem with the user's input; the message is a single actionable line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class StoreError(MorphcacheError):
    """The path is not a usable feature store (missing, truncated, other version, mismatched spec)."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given path (also a :class:`FileNotFoundError`, so generic file handling catches it)."""


class SpecMismatchError(StoreError, ValueError):
    """An existing store was created with a different spec than the one requested (also a :class:`ValueError`)."""


class BadImageError(MorphcacheError, ValueError):
    """An input image cannot be decoded or rendered.

    ``reason`` is the store's status code for it (``morphcache.store.image_table.STATUS_REASONS``); ``index`` is
    the position of the failing sample in a rendered batch, when known. Extraction records the reason and goes on
    under ``--on-bad-image skip`` and re-raises it under ``--on-bad-image fail``. Also a :class:`ValueError`.
    """

    def __init__(self, message: str, reason: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index


class ConfigError(MorphcacheError, ValueError):
    """Incompatible options, e.g. a student whose token grid does not match the store (also a :class:`ValueError`)."""


def error_from_worker(exc: BaseException) -> MorphcacheError | None:
    """The :class:`MorphcacheError` a worker process raised, recovered from the traceback text that DALI's
    parallel external source or a torch DataLoader worker re-raises in the main process (as a bare ``Exception``
    or with a multi-line message); None when ``exc`` does not carry one."""
    text = str(exc)
    found = list(_REPORTED.finditer(text))
    if not found:
        return exc if isinstance(exc, MorphcacheError) else None
    # the traceback's last line is "morphcache.errors.<Name>: <one-line message>" (torch joins the lines)
    name, message = found[-1].group(1), text[found[-1].end():].split("\n", 1)[0].strip()
    kind = globals().get(name)
    kind = kind if isinstance(kind, type) and issubclass(kind, MorphcacheError) else MorphcacheError
    return kind(message)


def reraise_from_worker(exc: BaseException):
    """Raise the one-line :class:`MorphcacheError` that ``exc`` carries from a worker process (see
    :func:`error_from_worker`), or ``exc`` itself; the loaders call it on whatever their workers raise."""
    err = error_from_worker(exc)
    if err is None:
        raise exc
    raise err from None
