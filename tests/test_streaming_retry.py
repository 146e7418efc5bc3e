"""The retry policy of shard reads as a pure schedule: delays and give-up asserted without waiting."""

from __future__ import annotations

import random

import pytest

from eossl.streaming.retry import BACKOFF_CAP_S, RetryPolicy, retry
from eossl.streaming.storage import StorageError, StorageOptions
from eossl.streaming.storage_errors import CorruptShardError

URL = "s3://bucket/ds/shards/shard-000003.tar"


class Flaky:
    """Fails ``failures`` times with ``error``, then returns ``b"ok"``; counts its calls."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"attempt {self.calls}")
        return b"ok"


def test_delays_double_up_to_the_cap_with_jitter_in_half_to_one():
    policy = RetryPolicy(retries=8, backoff_s=0.5)
    delays = policy.delays(random.Random(0))
    nominal = [min(BACKOFF_CAP_S, 0.5 * 2**a) for a in range(8)]  # 0.5 1 2 4 8 16 30 30
    assert len(delays) == 8 and nominal[-2:] == [BACKOFF_CAP_S, BACKOFF_CAP_S]
    for got, top in zip(delays, nominal, strict=True):
        assert 0.5 * top <= got <= top
    assert delays == RetryPolicy(retries=8, backoff_s=0.5).delays(
        random.Random(0)
    )  # same seed, same schedule
    assert RetryPolicy(retries=0).delays() == []


def test_retry_sleeps_the_policy_schedule_then_returns():
    slept: list[float] = []
    counted: list[int] = []
    request = Flaky(failures=3)
    policy = RetryPolicy(retries=5, backoff_s=0.25)
    got = retry(
        request,
        policy,
        URL,
        "GET bytes 0-10",
        sleep=slept.append,
        rng=random.Random(7),
        on_retry=lambda: counted.append(1),
    )
    assert got == b"ok" and request.calls == 4 and len(counted) == 3
    assert slept == RetryPolicy(retries=3, backoff_s=0.25).delays(random.Random(7))  # the first 3 delays


def test_retry_gives_up_after_n_retries_naming_the_url():
    slept: list[float] = []
    request = Flaky(failures=100, error=TimeoutError)
    with pytest.raises(
        StorageError,
        match=rf"{URL}: download failed after 3 attempts; last error: "
        r"TimeoutError: attempt 3",
    ):
        retry(request, RetryPolicy(retries=2, backoff_s=1.0), URL, "download", sleep=slept.append)
    assert request.calls == 3 and len(slept) == 2  # no wait after the last attempt
    assert 0.5 <= slept[0] <= 1.0 and 1.0 <= slept[1] <= 2.0


@pytest.mark.parametrize(
    ("error", "raised", "match"),
    [
        (FileNotFoundError, StorageError, "not found"),
        (PermissionError, StorageError, "access denied"),
        (CorruptShardError, CorruptShardError, "attempt 1"),
        (ValueError, ValueError, "attempt 1"),
    ],
)
def test_final_errors_are_not_retried(error, raised, match):
    slept: list[float] = []
    request = Flaky(failures=1, error=error)
    with pytest.raises(raised, match=match):
        retry(request, RetryPolicy(retries=5), URL, "GET", sleep=slept.append)
    assert request.calls == 1 and slept == []


def test_storage_options_give_the_reader_its_policy():
    assert StorageOptions(retries=2, backoff_s=0.1).retry_policy == RetryPolicy(retries=2, backoff_s=0.1)
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
