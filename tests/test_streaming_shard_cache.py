"""The node-local shard cache without a store: a fake clock drives the touch interval (the LRU clock)."""

from __future__ import annotations

import os
from pathlib import Path

from eossl.streaming.shard_cache import TOUCH_EVERY_S, ShardCache
from eossl.streaming.storage import StorageOptions

SHARDS = [{"path": "shards/shard-000000.tar", "bytes": 4, "sha256": "ab" * 32}]


def _cache(tmp_path: Path, now: list[float], forgotten: list[int]) -> ShardCache:
    def fetch(shard: int, tmp: Path) -> None:
        tmp.write_bytes(b"tar!")

    return ShardCache(
        "s3://bucket/ds",
        SHARDS,
        StorageOptions(cache_dir=str(tmp_path), verify_downloads=False),
        fetch=fetch,
        count=lambda **_: None,
        forget=forgotten.append,
        clock=lambda: now[0],
    )


def _age(path: Path) -> None:
    os.utime(path, (1_000_000, 1_000_000))


def test_touch_refreshes_mtime_at_most_every_interval(tmp_path):
    now, forgotten = [100.0], []
    cache = _cache(tmp_path, now, forgotten)
    path, downloaded = cache.ensure(0)
    assert downloaded and path.read_bytes() == b"tar!" and path.parent.parent == tmp_path.resolve()
    _age(path)
    cache.touch(0)  # the download itself counts as a touch at t=100
    assert path.stat().st_mtime == 1_000_000
    now[0] = 100 + TOUCH_EVERY_S - 0.01
    cache.touch(0)
    assert path.stat().st_mtime == 1_000_000
    now[0] = 100 + TOUCH_EVERY_S
    cache.touch(0)
    assert path.stat().st_mtime > 1_000_000
    _age(path)
    now[0] += TOUCH_EVERY_S / 2
    cache.touch(0)  # within the interval of the last touch
    assert path.stat().st_mtime == 1_000_000 and forgotten == []


def test_touch_of_an_evicted_shard_drops_the_readers_fd(tmp_path):
    now, forgotten = [0.0], []
    cache = _cache(tmp_path, now, forgotten)
    path, _ = cache.ensure(0)
    path.unlink()  # another process evicted it
    now[0] = TOUCH_EVERY_S
    cache.touch(0)
    assert forgotten == [0] and not cache.is_complete(0)
    assert cache.ensure(0) == (path, True)  # downloaded again
