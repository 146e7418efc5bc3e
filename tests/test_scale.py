"""Nothing grows with the dataset where it need not: the whole path (ingest, plan, one loader epoch, k-NN)
at two sizes, peak memory compared. Each size runs in its own process, so each peak is its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SMALL, LARGE = 48, 192  # 4x the samples (~120 MB and ~480 MB of sample bytes)


def _run(n: int, work: Path) -> dict:
    script = Path(__file__).with_name("scale_pipeline.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(n), str(work)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two processes of their own: a peak RSS is per process
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    small = _run(SMALL, tmp_path / "small")
    shutil.rmtree(tmp_path / "small")  # ~0.4 GB of source, Zarr and shards: not needed for the larger run
    large = _run(LARGE, tmp_path / "large")
    assert large["samples_loaded"] == LARGE and small["samples_loaded"] == SMALL
    # What the pipeline adds above imports and the source tree. A stage that held the epoch's samples,
    # a whole shard set or the dataset's arrays would add ~2.5 MB per extra sample: 360 MB here.
    grown = (large["peak_mb"] - large["baseline_mb"]) - (small["peak_mb"] - small["baseline_mb"])
    assert grown < 60, (small, large)
    assert large["peak_mb"] / small["peak_mb"] < 1.25, (small, large)
