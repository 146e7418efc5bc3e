"""The retry policy of every network request of the shard reader: exponential backoff with jitter.

The policy is a pure schedule (``RetryPolicy.delay``) and ``retry`` takes its ``sleep`` and random source
as arguments, so the back-off schedule and the give-up are tested with a recording sleep and a seeded
generator, without waiting. The client's own retries are turned off by the reader: the two would multiply.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .storage_errors import CorruptShardError, StorageError

__all__ = ["BACKOFF_CAP_S", "RetryPolicy", "ShortResponseError", "retry"]

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 30.0
T = TypeVar("T")


class ShortResponseError(OSError):
    """A response with fewer (or other) bytes than the catalog says: retried like a network error, since a
    connection cut mid-body or a corrupting hop passes; raised as ``CorruptShardError`` when every attempt
    gives the same answer (then the object itself disagrees with the catalog)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed request is repeated and how long to wait before each repeat.

    Attributes:
        retries: attempts after the first failure (0 = fail on the first error).
        backoff_s: first delay; doubles per attempt up to ``cap_s``, each scaled by a random factor in
            [0.5, 1] so that many workers do not retry in lockstep.
        cap_s: the longest single delay.
    """

    retries: int = 5
    backoff_s: float = 0.5
    cap_s: float = BACKOFF_CAP_S

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.cap_s < 0:
            raise ValueError(f"retries, backoff_s and cap_s must be >= 0, got {self}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (0-based): backoff * 2**attempt capped, times U[0.5, 1]."""
        return min(self.cap_s, self.backoff_s * 2**attempt) * (0.5 + 0.5 * (rng or random).random())

    def delays(self, rng: random.Random | None = None) -> list[float]:
        """The whole schedule: one delay per retry, in order."""
        return [self.delay(attempt, rng) for attempt in range(self.retries)]


def retry(
    request: Callable[[], T],
    policy: RetryPolicy,
    url: str,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run ``request`` under ``policy``; raise ``StorageError`` naming ``url`` when it gives up.

    A missing object or a refused access is final at once (no retry can fix it), and so are corrupt
    bytes and programming errors (``ValueError``, ``TypeError``); anything else (connection refused or
    reset, timeouts, 5xx, throttling, a short or damaged response: ``ShortResponseError``) is retried after
    ``policy.delay(attempt)``. A response still short or damaged after the last attempt raises
    ``CorruptShardError``: the object itself disagrees with the catalog.

    Args:
        request: one attempt; its return value is returned.
        policy: retries and back-off.
        url: the object, named in every message.
        what: the request, e.g. ``"GET bytes 0-512"`` or ``"download"``.
        sleep: waits between attempts (a recording function in tests).
        rng: the jitter's random source (module ``random`` when None).
        on_retry: called once per retry (the reader counts them).
    """
    attempts = policy.retries + 1
    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            return request()
        except FileNotFoundError as exc:
            raise StorageError(f"{url}: not found ({what})") from exc
        except PermissionError as exc:
            raise StorageError(f"{url}: access denied ({what}): {exc}") from exc
        except (CorruptShardError, StorageError, ValueError, TypeError):
            raise
        except Exception as exc:  # connection refused/reset, timeouts, 5xx, throttling, client errors
            last = exc
            if attempt + 1 < attempts:
                if on_retry is not None:
                    on_retry()
                delay = policy.delay(attempt, rng)
                log.warning(
                    "%s: %s failed (%s: %s); retry %d/%d in %.2f s",
                    url,
                    what,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    attempts - 1,
                    delay,
                )
                sleep(delay)
    if isinstance(last, ShortResponseError):
        raise CorruptShardError(f"{last} (the same after {attempts} attempts)") from last
    raise StorageError(
        f"{url}: {what} failed after {attempts} attempts; last error: {type(last).__name__}: {last}"
    ) from last
