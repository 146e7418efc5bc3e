"""The timing harness every bench shares: machine facts, rates, interleaved runs, the CPU meter, output.

A bench reports ratios measured in one run (never absolute targets): the machine, its load and its disk
change absolute numbers, ratios against a baseline timed alongside do not. Two sides are compared by
interleaved runs (ours, baseline, then baseline, ours, ...) so that a shared machine's changing load hits
both alike, and by CPU-milliseconds per sample of the whole process tree, which moves much less with
other load than wall-clock rates do.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np

__all__ = [
    "Epochs",
    "calls_per_second",
    "compare",
    "machine_info",
    "print_result",
    "single",
    "timed_run",
    "tree_cpu_s",
    "wait_idle",
    "write_sample_dataset",
]

Epochs = Callable[[], int]  # delivers one whole epoch, returns its sample count


def machine_info() -> dict:
    """What every result records about the machine it ran on."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def print_result(result: dict, as_json: bool) -> None:
    """One JSON line (``--json``: last line of the output, for scripts) or the same JSON indented."""
    print(json.dumps(result) if as_json else json.dumps(result, indent=1))


def calls_per_second(fn: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Calls per second of ``fn``, repeated for at least ``min_seconds`` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return n / elapsed


def tree_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process and its live descendants; None off Linux."""
    if not os.path.isdir("/proc"):
        return None
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state): ppid, ..., utime, stime
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = int(fields[11]) + int(fields[12])
    tree, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(used.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def wait_idle(timeout_s: float = 10.0, interval_s: float = 0.2) -> None:
    """Wait until our processes use < 10 % of a core: a finished side's prefetch must not overlap the next."""
    last, deadline = tree_cpu_s(), time.monotonic() + timeout_s
    while last is not None and time.monotonic() < deadline:
        time.sleep(interval_s)
        now = tree_cpu_s()
        if now - last < 0.1 * interval_s:
            return
        last = now


def timed_run(epochs: Epochs, min_samples: int, min_epochs: int = 2, min_cpu_s: float = 0.0) -> dict:
    """One run: a lead-in epoch (untimed, so the run starts in steady state), then timed whole epochs.

    ``min_cpu_s``: also go on until the process tree has used this much CPU time, for a CPU cost per sample
    that the clock's resolution (10 ms ticks in ``/proc``) does not round to nothing.
    """
    epochs()
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    n = count = 0
    cpu1 = cpu0
    while n < min_samples or count < min_epochs or (cpu0 is not None and cpu1 - cpu0 < min_cpu_s):
        n += epochs()
        count += 1
        if min_cpu_s and cpu0 is not None:
            cpu1 = tree_cpu_s()
    seconds, cpu1 = time.perf_counter() - t0, tree_cpu_s()
    return {
        "samples_per_s": n / seconds,
        "cpu_ms_per_sample": None if cpu0 is None else 1000 * (cpu1 - cpu0) / n,
        "samples": n,
        "epochs": count,
    }


def _summary(runs: list[dict]) -> dict:
    cpu = [r["cpu_ms_per_sample"] for r in runs]
    return {
        "samples_per_s": round(float(np.median([r["samples_per_s"] for r in runs])), 1),
        "cpu_ms_per_sample": None if None in cpu else round(float(np.median(cpu)), 2),
        "runs_samples_per_s": [round(r["samples_per_s"], 1) for r in runs],
        "samples_per_run": runs[-1]["samples"],
        "epochs_per_run": runs[-1]["epochs"],
    }


def compare(ours: Epochs, baseline: Epochs, min_samples: int, repeat: int) -> dict:
    """Interleaved runs (ours, baseline, baseline, ours, ...) so that both sides see the same machine load.

    Both sides are alive throughout; before each run the other side's background work (DALI prefetches
    the next epoch as soon as one ends) is waited out. The speedup is the median of per-round ratios.
    """
    sides = {"ours": ours, "geotiff_dataloader": baseline}
    for epochs in sides.values():
        epochs()  # warm-up: worker start-up, first reads
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeat):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
            wait_idle()
            runs[name].append(timed_run(sides[name], min_samples))
    ratios = [
        o["samples_per_s"] / b["samples_per_s"]
        for o, b in zip(runs["ours"], runs["geotiff_dataloader"], strict=True)
    ]
    out = {name: _summary(rs) for name, rs in runs.items()}
    cpu_o, cpu_b = out["ours"]["cpu_ms_per_sample"], out["geotiff_dataloader"]["cpu_ms_per_sample"]
    return {
        **out,
        "speedup": round(float(np.median(ratios)), 2),
        "runs_speedup": [round(x, 2) for x in ratios],
        "cpu_efficiency": None if cpu_o is None else round(cpu_b / cpu_o, 2),
    }


def single(epochs: Epochs, min_samples: int, repeat: int) -> dict:
    """One side alone (no baseline to interleave with): a warm-up epoch, then ``repeat`` timed runs."""
    epochs()
    return _summary([timed_run(epochs, min_samples) for _ in range(repeat)])


def write_sample_dataset(
    folder: str, patches: int, formats: tuple[str, ...] | None = None
) -> tuple[str, str]:
    """Synthetic GeoTIFFs (``folder/src``, seed 0) ingested into ``folder/ds`` in 32 MB shards, no subsets.

    ``formats`` None keeps the ingest's default outputs.

    Returns:
        (source, dataset) paths.
    """
    from eossl.ingest.config import IngestConfig, SplitOptions
    from eossl.ingest.sample_data import write_sample_data
    from eossl.ingest.writer import run_ingest

    source, dataset = f"{folder}/src", f"{folder}/ds"
    write_sample_data(source, patches, seed=0)
    chosen = {} if formats is None else {"formats": formats}
    run_ingest(
        IngestConfig(
            source=source,
            dataset=dataset,
            **chosen,
            progress=False,
            shard_bytes=32 * 2**20,
            split=SplitOptions(budgets=()),
        )
    )
    return source, dataset
