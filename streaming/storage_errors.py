"""The two ways a shard read fails, shared by the reader, its retry loop and the node-local cache.

They differ in what helps: a ``StorageError`` (unreachable, not found) may pass when the store comes back;
a ``CorruptShardError`` (bytes that disagree with the manifest) never does, so it is not retried.
"""

from __future__ import annotations

__all__ = ["CorruptShardError", "StorageError"]


class StorageError(RuntimeError):
    """The object store or file is unavailable (after retries, or not found): names the object URL."""


class CorruptShardError(RuntimeError):
    """A shard's bytes disagree with the manifest (truncated, short read, checksum): names the file/URL."""
