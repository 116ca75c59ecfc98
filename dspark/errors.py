"""Exceptions raised by DSpark.

Every error a user can trigger with bad input derives from `DSparkError`, so callers (the CLI, the
HTTP server) can turn them into a clean message instead of a traceback. Errors about bad *values*
also derive from `ValueError` so generic code that catches `ValueError` keeps working.
"""

from __future__ import annotations


class DSparkError(Exception):
    """Base class of every error DSpark raises on purpose."""


class CheckpointError(DSparkError, ValueError):
    """A model or tokenizer directory is missing a file, or a file holds something we cannot use.

    The message always names the file (and the key inside it, where there is one).
    """


class TokenizerError(DSparkError, ValueError):
    """The tokenizer cannot do what was asked (e.g. no chat template to apply)."""


class CacheError(DSparkError, ValueError):
    """Misuse of the KV cache: unknown slot, bad rollback length."""


class CacheFullError(CacheError):
    """Every sequence slot of the KV cache is taken."""


class ContextOverflowError(CacheError):
    """Appending tokens would push a sequence past the cache's `max_len`."""
