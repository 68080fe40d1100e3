"""The errors the jobs raise on purpose, in one place.

Each derives from the builtin it stands for, so a caller catching that builtin keeps working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Settings that cannot be used; the message names the key and what is allowed."""


class SchemaMismatchError(ValueError):
    """A table, or a frame written to it, has other columns than expected."""


class GenerationNotFoundError(LookupError):
    """A model generation asked for is not in the tables."""


class QueryFailedError(RuntimeError):
    """A streaming query stopped with an error."""


class HalfWrittenBatchError(RuntimeError):
    """A stream must not start while another stream's micro-batch is half written in the same tables."""


class ConcurrentRunError(RuntimeError):
    """Another run of the same job holds the tables."""


class ConcurrentWriterError(RuntimeError):
    """Another stream wrote, or is writing, a batch number this stream took: two writers on the same tables."""


class StateRestoredError(RuntimeError):
    """The live state was restored to an earlier version, and no generation can rebuild it."""
