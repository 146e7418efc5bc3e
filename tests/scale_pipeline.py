"""One process: ingest N synthetic patches -> plan -> one epoch of the loader -> k-NN; prints a JSON line
with the peak RSS after imports and at the end (run by test_scale.py at two sizes).

Usage: python tests/scale_pipeline.py N WORKDIR
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(n: int, work: Path) -> dict:
    import numpy as np
    import torch

    from eossl.eval.knn import knn_scores
    from eossl.eval.probes import ProbeConfig
    from eossl.ingest.config import IngestConfig, SplitOptions
    from eossl.ingest.sample_data import write_sample_data
    from eossl.ingest.writer import run_ingest
    from eossl.streaming.inputs import InputSpec
    from eossl.streaming.loader import LoaderConfig, SSLLoader
    from eossl.streaming.plan import PlanConfig
    from eossl.streaming.views import ViewConfig

    source, dataset = work / "src", work / "ds"
    write_sample_data(source, n, seed=0, patches_per_scene=8)
    baseline = _peak_mb()  # imports and the source tree: the same at every size
    summary = run_ingest(
        IngestConfig(
            str(source),
            str(dataset),
            workers=1,
            progress=False,
            shard_bytes=8 * 10**6,
            zarr_shard_samples=16,  # the Zarr writer's block buffer is full at both sizes
            split=SplitOptions(budgets=(), holdout_fraction=0.3),
        )
    )
    assert summary.written == n, summary
    after_ingest = _peak_mb()
    views = ViewConfig(mode="single", inputs=InputSpec(sensors=("s2",)), size=32)
    cfg = LoaderConfig(
        batch_size=4,  # 12+ steps at both sizes: DALI's queues reach their steady size
        split="all",
        device="cpu",
        workers=0,
        num_threads=1,
        views=views,
        plan=PlanConfig(seed=0, shuffle_buffer=64),
    )
    loader = SSLLoader(str(dataset), cfg, rank=0, world_size=1)
    feats, rows = [], []
    for batch in loader:  # one epoch; each batch reduced at once to 10 band means per sample
        feats.append(batch.views[0].float().mean(dim=(2, 3)))
        rows.append(batch.rows)
    x, r = torch.cat(feats).numpy(), torch.cat(rows).numpy()
    _, first = np.unique(r, return_index=True)  # padding repeats samples: keep one of each
    x, r = x[first], r[first]
    after_epoch = _peak_mb()
    train = np.asarray(loader.catalog.train)[r]
    labels = np.asarray(loader.catalog.label_igbp_simple)[r].astype(np.int64)
    scores = knn_scores(
        x[train], np.clip(labels[train] - 1, 0, 9), x[~train], 10, False, ProbeConfig(knn_memory_mb=0.05)
    )
    assert scores.shape == (int((~train).sum()), 10)
    return {
        "patches": n,
        "baseline_mb": baseline,
        "after_ingest_mb": after_ingest,
        "after_epoch_mb": after_epoch,
        "peak_mb": _peak_mb(),
        "samples_loaded": int(len(r)),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), Path(sys.argv[2]))))
