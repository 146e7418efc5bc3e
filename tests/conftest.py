"""Shared fixtures: real patches, GeoTIFF writing for crafted inputs, synthetic sources, the shared ingested
dataset, tiny training configs, local servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from eossl.ingest.real_samples import REAL_PATCHES_DIR

REPO = Path(__file__).resolve().parents[1]

REAL_S1_P30 = REAL_PATCHES_DIR / "ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif"
REAL_LC_P30 = REAL_PATCHES_DIR / "ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p30.tif"
REAL_S1_P839 = REAL_PATCHES_DIR / "ROIs1970_fall/s1_139/ROIs1970_fall_s1_139_p839.tif"
REAL_S2_P839 = REAL_PATCHES_DIR / "ROIs1970_fall/s2_139/ROIs1970_fall_s2_139_p839.tif"


def read_tif(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(), {"crs": ds.crs, "transform": ds.transform}


def write_tif(
    path: Path, data: np.ndarray, crs="EPSG:32650", transform: Affine | None = None, nodata=None
) -> Path:
    """Write a (C, H, W) array as an uncompressed GeoTIFF, like SEN12MS files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    transform = transform or Affine(10.0, 0.0, 701879.9106015414, 0.0, -10.0, 3710139.5406956286)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as ds:
        ds.write(data)
    return path


def sen12ms_path(
    root: Path, mod: str, roi: str = "ROIs1970", season: str = "fall", scene: int = 139, patch: int = 839
) -> Path:
    return root / f"{roi}_{season}" / f"{mod}_{scene}" / f"{roi}_{season}_{mod}_{scene}_p{patch}.tif"


def spoil_s1(path: Path) -> None:
    """Non-finite pixels in an S1 GeoTIFF, as real SEN12MS patches have: 10 NaN in VV (rows 10-11,
    columns 20-24), +Inf at (100, 100) and -Inf at (101, 100) in VH. Ingest keeps them; readers fill them."""
    import rasterio

    with rasterio.open(path, "r+") as f:
        s1 = f.read()
        s1[0, 10:12, 20:25] = np.nan
        s1[1, 100, 100] = np.inf
        s1[1, 101, 100] = -np.inf
        f.write(s1)


def complete_triplet(
    root: Path, scene: int, patch: int, roi: str = "ROIs1970", season: str = "fall", x_offset: float = 0.0
) -> dict[str, Path]:
    """A complete triplet built from the real p839 S1/S2 and the real p30 land cover, on p839's grid."""
    s1, meta = read_tif(REAL_S1_P839)
    s2, _ = read_tif(REAL_S2_P839)
    lc, _ = read_tif(REAL_LC_P30)
    t = meta["transform"] @ Affine.translation(x_offset, 0)
    return {
        mod: write_tif(sen12ms_path(root, mod, roi, season, scene, patch), arr, meta["crs"], t)
        for mod, arr in (("s1", s1), ("s2", s2), ("lc", lc))
    }


@pytest.fixture
def real_source(tmp_path: Path) -> Path:
    """The shipped real patches copied to a scratch folder (tests may add files beside them)."""
    dst = tmp_path / "real"
    shutil.copytree(REAL_PATCHES_DIR, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    """24 synthetic complete triplets (6 scenes x 4 patches), shared read-only by the session."""
    from eossl.ingest.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("synthetic") / "sen12ms"
    write_sample_data(root, 24, seed=0, patches_per_scene=4)
    return root


# The union of what the modules reading ``dataset`` need: budgets 2, 4 and 8 for seeds 0 and 1 (evaluation
# grids), two of the six scenes held out (scene-split tests), 8 MB shards (3 patches each: 8 shards). Extra
# budgets change nothing else: each (budget, seed) subset is its own seeded draw, and the band statistics
# cover every patch whatever the split.
DATASET_INGEST = (
    "--shard-size",
    "8MB",
    "--budgets",
    "2,4,8",
    "--budget-seeds",
    "0,1",
    "--holdout-fraction",
    "0.34",
)

# The smallest MoCo and DINO runs that still exercise every part of the method on CPU, as ``--set`` values.
TINY_MOCO = {
    "backbone": "resnet18",
    "batch_size": "8",
    "queue_size": "32",
    "hidden": "64",
    "dim": "32",
    "size": "64",
    "workers": "0",
    "threads": "1",
    "split": "all",
    "device": "cpu",
}
TINY_DINO = {
    "backbone": "vit_tiny_patch16_224",
    "batch_size": "8",
    "size": "32",
    "local_size": "16",
    "n_local": "2",
    "out_dim": "64",
    "dino.hidden": "64",
    "bottleneck": "16",
    "workers": "0",
    "threads": "1",
    "split": "all",
    "device": "cpu",
    "dino.drop_path": "0.0",
}


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Iterator[Callable[[str], Path]]:
    """`module_tmp(name)`: a new directory that lives as long as the test module. Removed when the module's
    last test ends, unless a test failed meanwhile (kept to look at, like a failing test's `tmp_path`).
    Module fixtures hold datasets and training runs of 0.2-0.5 GB each; kept to the session's end they
    would add up to several GB on a CI disk."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def cli_set(values: dict) -> list[str]:
    """``--set key=value`` arguments for the training command."""
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _file_states(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def dataset(synthetic_source, tmp_path_factory) -> Iterator[Path]:
    """``synthetic_source`` ingested once by the real CLI (``DATASET_INGEST``), shared read-only by the
    session.

    Ingesting is the slow part of most end-to-end tests, so every module reads this one. A test that changes
    files takes ``copy_of_dataset``; a module that needs other ingest options on purpose (shard size, budgets,
    hold-out) defines its own ``dataset`` fixture, which replaces this one for that module. A file changed
    here fails the session at teardown, since later tests would read it.
    """
    out = tmp_path_factory.mktemp("ingested") / "ds"
    run_cli("ingest", str(synthetic_source), str(out), *DATASET_INGEST, "--no-progress")
    before = _file_states(out)
    yield out
    assert _file_states(out) == before, f"a test changed the shared dataset {out}: use copy_of_dataset"


@pytest.fixture
def copy_of_dataset(dataset: Path, tmp_path: Path) -> Path:
    """A private copy of ``dataset`` for a test that corrupts or rewrites files."""
    return Path(shutil.copytree(dataset, tmp_path / "dataset-copy"))


WATCHED_IN_CHECKOUT = ("mlruns", "mlartifacts", "mlflow.db", "moto_recording")
_PRESENT_AT_START = {name for name in WATCHED_IN_CHECKOUT if (REPO / name).exists()}


@pytest.fixture(autouse=True)
def nothing_is_written_into_the_checkout():
    """Tests and the processes they start run in the checkout: a file they leave there (MLflow's
    ``./mlflow.db`` default store, a server's recording) would land wherever a user runs the command. Checked
    after every test, so the test that wrote it is the one that fails (and the file is removed, so the
    next tests are judged on their own)."""
    yield
    leaked = sorted(name for name in WATCHED_IN_CHECKOUT if (REPO / name).exists())
    leaked = [name for name in leaked if name not in _PRESENT_AT_START]
    for name in leaked:
        path = REPO / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not leaked, f"this test wrote {leaked} into {REPO}"


@pytest.fixture(autouse=True)
def mlflow_variables_are_restored():
    """Every test starts with the session's ``MLFLOW_*`` variables and MLflow's in-process store unset:
    a URI left behind by one test would send the next test's runs (and its subprocesses') elsewhere."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(before)


def run_cli(*args: str, check: bool = True, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real ``eossl`` command in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "eossl.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"eossl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible server process for the session; sets the standard AWS variables."""
    from servers import aws_environment, moto_s3_server

    with moto_s3_server(tmp_path_factory.mktemp("moto")) as endpoint, aws_environment(endpoint):
        yield endpoint


def history_steps(run: Path) -> list[int]:
    """The steps a training run logged to RUN_DIR/history.jsonl (empty before its first log)."""
    path = run / "history.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def train_compiled(cfg) -> None:
    """Train ``cfg`` (``compile=true``) in this process, which has imported torch and timm already (a
    training command would import them again): dynamo's counters show that a graph was compiled, and the
    compiled graphs are forgotten afterwards so that later tests in this process run eagerly."""
    import torch
    from torch._dynamo.utils import counters

    from eossl.train.loop import train

    counters.clear()
    try:
        train(cfg, resume=False)
        assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    finally:
        torch._dynamo.reset()


def training_env() -> dict:
    """This environment without tracking and rank variables, for training subprocesses started by tests."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }


def pytest_configure(config):
    """One OpenMP thread per process, in the test processes and every process they start.

    The suite runs in pytest-xdist workers that start training processes side by side on a small machine.
    PyTorch's default, a thread per core in every process, oversubscribes the cores, and its OpenMP threads
    spin while they wait: in-process training steps ran 20-40x slower under the suite's load than alone.
    (``accelerate launch`` likewise divides the cores among the ranks it starts.)
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # imported before this hook: set its pool directly
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Files whose tests start many training processes, longest first. pytest-xdist (``--dist loadfile``) hands
# files to its workers in collection order: starting with these keeps one long file from running alone at
# the end while the other worker idles.
LONGEST_FILES = (
    "test_failures.py",
    "test_study.py",
    "test_train_distributed.py",
    "test_launch_kits.py",
    "test_eval_classify.py",
    "test_eval_segment.py",
    "test_train_moco.py",
    "test_fail_fast.py",
    "test_train_dino.py",
    "test_sample_data.py",
    "test_install.py",
    "test_train_faithful.py",
    "test_launch_bench.py",
)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where CUDA is not available, so the marker alone says it.

    Files of ``LONGEST_FILES`` come first, in its order; the others keep theirs.
    """
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
