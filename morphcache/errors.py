"""User-facing errors.

Every validation failure the user can cause (a wrong path, a corrupt image under ``--on-bad-image fail``, a store
of another schema version, a mismatched spec) raises a :class:`MorphcacheError` whose message is one line naming
the file or value and what to do. The CLI prints it as ``morphcache: error: <message>`` and exits with code 2.
Library code never uses ``assert`` for validation.
"""

from __future__ import annotations


class MorphcacheError(Exception):
    """A problem with the user's input; the message is a single actionable line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class StoreError(MorphcacheError):
    """The path is not a usable feature store (missing, truncated, other version, mismatched spec)."""


class SpecMismatchError(StoreError):
    """An existing store was created with a different spec than the one requested."""


class BadImageError(MorphcacheError):
    """An input image cannot be decoded or rendered.

    ``reason`` is the store's status code for it (``morphcache.store.image_table.STATUS_REASONS``); ``index`` is
    the position of the failing sample in a rendered batch, when known. Extraction records the reason and goes on
    under ``--on-bad-image skip`` and re-raises it under ``--on-bad-image fail``.
    """

    def __init__(self, message: str, reason: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index


class ConfigError(MorphcacheError):
    """Incompatible options, e.g. a student whose token grid does not match the store."""
