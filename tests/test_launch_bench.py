"""``eossl bench loader``: the result's shape, and that both sides do the same work on the same data.

No speed asserts: only what holds on any machine.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eossl.launch.bench.configs import LoaderBenchConfig
from eossl.launch.bench.geotiff_baseline import GeoTiffPatches, gdal_s3_options, geotiff_files, torch_view
from eossl.launch.bench.loader import bench_loader
from eossl.launch.bench.loader_sides import loader_configs, read_batches
from eossl.streaming.loader import LoaderConfig, SSLLoader

from conftest import run_cli

PATCHES = 8


@pytest.fixture(scope="module")
def tiny(module_tmp) -> tuple[Path, Path]:
    """8 synthetic patches (2 scenes) and their ingest in 2 shards."""
    from eossl.ingest.sample_data import write_sample_data

    root = module_tmp("bench")
    write_sample_data(root / "src", PATCHES, seed=1)
    run_cli(
        "ingest",
        str(root / "src"),
        str(root / "ds"),
        "--formats",
        "wds",
        "--shard-size",
        "10MB",
        "--budgets",
        "2",
        "--no-progress",
    )
    return root / "src", root / "ds"


def _baseline(source: Path, loader: SSLLoader) -> tuple[GeoTiffPatches, dict[int, int]]:
    """The baseline dataset over the loader's rows, and row id -> baseline index."""
    files = geotiff_files(str(source), loader.catalog.key[loader.rows])
    mean, std = loader.views.input_spec.normalisation(loader.manifest)
    return GeoTiffPatches(files, loader.views.input_spec, mean, std), {
        int(r): i for i, r in enumerate(loader.rows)
    }


def test_baseline_read_equals_loader_read_path(tiny):
    source, dataset = tiny
    loader = SSLLoader(str(dataset), loader_configs(workers=0, batch_size=4)["read"], rank=0, world_size=1)
    baseline, index = _baseline(source, loader)
    epochs = read_batches(loader)
    batches = list(next(epochs)())
    epochs.close()
    seen = set()
    for batch in batches:
        assert batch["x"].shape == (4, 12, 256, 256) and batch["x"].dtype == torch.float32
        for x, row in zip(batch["x"], batch["rows"].tolist(), strict=True):
            ref = baseline.read(index[row])
            torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-5)
            seen.add(row)
    assert seen == set(loader.rows.tolist())  # every sample compared


def test_baseline_augmentation_equals_loader_views(tiny):
    """Same parameters (ViewSet.draw at the sample's position) -> the same views, up to interpolation
    rounding."""
    source, dataset = tiny
    loader = SSLLoader(str(dataset), loader_configs(workers=0, batch_size=4)["augment"], rank=0, world_size=1)
    baseline, index = _baseline(source, loader)
    batch = next(iter(loader))
    blurred = 0
    for j, row in enumerate(batch.rows.tolist()):
        x = baseline.read(index[row])
        for v, p in enumerate(loader.views.draw(loader.cfg.plan.seed, batch.epoch, int(batch.positions[j]))):
            got = batch.views[v][j]
            ref = torch_view(x, p, 224)
            assert got.shape == ref.shape == (12, 224, 224)
            torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)  # values are standardised, |x| ~ 1
            assert (got - ref).abs().mean() < 1e-3
            blurred += float(p.sigma) > 0.05
    assert blurred > 0  # the blur path was compared too


@pytest.mark.slow
def test_baseline_reads_the_same_patches_from_s3(tiny, s3_endpoint):
    """The S3 baseline (GDAL /vsis3/ with the options derived from AWS_ENDPOINT_URL) reads what is on disk."""
    from servers import upload_tree

    source, dataset = tiny
    upload_tree(source, "s3://eossl-bench-geotiff/src")
    loader = SSLLoader(str(dataset), loader_configs(workers=0, batch_size=4)["read"], rank=0, world_size=1)
    local, _ = _baseline(source, loader)
    remote_files = geotiff_files("s3://eossl-bench-geotiff/src", loader.catalog.key[loader.rows])
    assert all(f.startswith("s3://eossl-bench-geotiff/src/") for pair in remote_files for f in pair)
    options = gdal_s3_options()
    assert options["AWS_S3_ENDPOINT"] == s3_endpoint.removeprefix("http://") and options["AWS_HTTPS"] == "NO"
    remote = GeoTiffPatches(
        remote_files,
        loader.views.input_spec,
        *loader.views.input_spec.normalisation(loader.manifest),
        gdal_options=options,
    )
    for i in (0, len(remote) - 1):
        torch.testing.assert_close(remote.read(i), local.read(i), atol=0, rtol=0)
    without_endpoint = GeoTiffPatches(
        remote_files,
        loader.views.input_spec,
        *loader.views.input_spec.normalisation(loader.manifest),
        gdal_options={k: v for k, v in options.items() if not k.startswith("AWS_")}
        | {
            "AWS_S3_ENDPOINT": "127.0.0.1:9",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
            "GDAL_HTTP_MAX_RETRY": "0",
            "GDAL_HTTP_CONNECTTIMEOUT": "2",
        },
    )
    with pytest.raises(
        OSError, match="s3://eossl-bench-geotiff/src/.*_s1_.*cannot read GeoTIFF"
    ):  # names the file, does not hang
        without_endpoint.read(0)


def test_raw_preads_read_every_span_once_per_epoch_in_their_processes(tiny):
    """The floor of the read CPU ratio: in as many processes as the reader has, each sample's S1+S2 span
    once per epoch, the bytes of the shard files; the processes end with it."""
    from eossl.launch.bench.raw_pread import RawPreads, _Reader, epoch_spans

    loader = SSLLoader(str(tiny[1]), LoaderConfig(batch_size=3, split="all", device="cpu", workers=0))
    paths, spans, stride = epoch_spans(loader)
    cat, order = loader.catalog, loader.plan(0).order  # the epoch's order: whole batches
    assert len(spans) == len(order) >= len(loader.rows) and all(size <= stride for _, _, size in spans)
    for (shard, offset, size), row in zip(spans, order, strict=True):  # both members of the sample
        assert shard == cat.shard[row] and offset == min(cat.offset["s1"][row], cat.offset["s2"][row])
        assert offset + size == max(cat.offset[s][row] + cat.size[s][row] for s in ("s1", "s2"))
    one = _Reader(paths, spans[-1:], stride, 1)
    one.epoch()
    with open(paths[spans[-1][0]], "rb") as f:
        f.seek(spans[-1][1])
        assert bytes(one.buffer[: spans[-1][2]]) == f.read(spans[-1][2])
    one.close()
    with RawPreads(loader, batches=3, processes=2) as preads:
        assert len(preads._procs) == 2 and all(p.is_alive() for p in preads._procs)
        assert preads() == preads() == len(spans)
        procs = list(preads._procs)
    assert not any(p.is_alive() for p in procs)


@pytest.mark.slow
@pytest.mark.timeout(900)  # every part of the bench: disk, CPU ratios, S3 with latency
def test_bench_loader_cli_with_local_s3_reports_every_number(tmp_path):
    """``eossl bench loader --local-s3 --json``: starts its own S3 server, times both sides from disk and
    S3."""
    # the command's temporary folder, too long for Unix sockets (as a cluster job's scratch folder can be);
    # nothing of the bench may stay there
    scratch = tmp_path / ("tmp-" + "x" * max(0, 100 - len(str(tmp_path))))
    scratch.mkdir()
    proc = run_cli(
        "bench",
        "loader",
        "--local-s3",
        "--patches",
        str(PATCHES),
        "--max-samples",
        "6",
        "--workers",
        "0",  # in-process readers on both sides: reader processes are tested with the loader itself
        "--batch-size",
        "3",
        "--samples",
        "8",
        "--repeat",
        "1",
        "--s3-latency-ms",
        "5",
        "--json",
        timeout=840,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples_in_dataset"] == 6 and result["settings"]["max_samples"] == 6  # of 8 patches
    comparisons = [result["read"], result["augment"]] + [
        result["s3"][stage][variant] for stage in ("read", "augment") for variant in ("cache", "no_cache")
    ]
    first = result["s3"]["first_epoch"]  # one round each on an empty cache, with and without reading ahead
    assert {name: len(rates) for name, rates in first["rounds"].items()} == {
        "read_while_downloading": 1,
        "waiting_for_downloads": 1,
    }
    assert first["speedup"] == pytest.approx(
        first["samples_per_s"]["read_while_downloading"] / first["samples_per_s"]["waiting_for_downloads"],
        rel=0.02,
    )
    for comparison in comparisons:
        for side in ("ours", "geotiff_dataloader"):
            run = comparison[side]
            assert run["samples_per_s"] > 0 and run["epochs_per_run"] == 2
            assert run["samples_per_run"] == 12  # epochs of the 6 benched samples, on both sides
            assert run["cpu_ms_per_sample"] > 0
        assert comparison["speedup"] == pytest.approx(
            comparison["ours"]["samples_per_s"] / comparison["geotiff_dataloader"]["samples_per_s"], rel=0.02
        )
    for key in (
        "read_speedup_vs_geotiff",
        "speedup_vs_geotiff",
        "read_cpu_efficiency_vs_geotiff",
        "cpu_efficiency_vs_geotiff",
        "s3_read_speedup_vs_geotiff",
        "s3_speedup_vs_geotiff",
        "s3_nocache_read_speedup_vs_geotiff",
        "s3_nocache_speedup_vs_geotiff",
        "s3_first_epoch_read_while_downloading_speedup",
        "s3_samples_per_s",
        "s3_read_samples_per_s",
        "read_cpu_over_raw_pread",
        "read_cpu_over_raw_pread_into_batches",
        "read_cpu_over_raw_pread_one_process",
        "transport_cpu_over_raw_pread",
        "read_stage_cpu_over_raw_pread",
        "augment_cpu_over_torch",
        "dali_graph_over_torch",
        "reader_samples_per_s_per_core",
    ):
        assert result[key] > 0, key
    assert result["s3_latency_ms"] == 5 and result["s3"]["latency_model"]["latency_ms_per_request"] == 5
    cpu = result["cpu_ms_per_sample"]
    assert result["read_cpu_over_raw_pread"] == pytest.approx(cpu["reader"] / cpu["raw_pread"], rel=0.02)
    assert result["read_cpu_over_raw_pread_into_batches"] == pytest.approx(
        cpu["reader"] / cpu["raw_pread_into_batches"], rel=0.02
    )
    assert result["read_cpu_over_raw_pread_one_process"] == pytest.approx(
        cpu["reader"] / cpu["raw_pread_one_process"], rel=0.02
    )
    assert result["raw_pread_processes"] == 1  # as many as the reader's: none here (workers=0)
    assert result["augment_cpu_over_torch"] == pytest.approx(
        cpu["augment_cpu_mode"] / cpu["augment_torch"], rel=0.02
    )
    assert result["s3_speedup_vs_geotiff"] == result["s3"]["augment"]["cache"]["speedup"]
    assert result["s3"]["endpoint_from_env"] and result["s3"]["source"].startswith("s3://")
    assert (result["gpu_samples_per_s"] is None) == (not torch.cuda.is_available())
    assert result["settings"]["workers"] == 0 and result["settings"]["batch_size"] == 3
    assert np.isfinite(result["machine"]["load_avg_1m_at_end"])
    assert (
        list(scratch.glob("eossl-bench-*")) == []
    )  # generated data, shard cache and server logs are removed


def test_bench_loader_rejects_half_given_inputs(tiny):
    with pytest.raises(ValueError, match="both"):
        bench_loader(LoaderBenchConfig(str(tiny[0]), None))
    with pytest.raises(ValueError, match="s3_dataset"):
        bench_loader(LoaderBenchConfig(str(tiny[0]), "s3://bucket/ds"))
    with pytest.raises(ValueError, match="s3_source"):
        bench_loader(LoaderBenchConfig(str(tiny[0]), str(tiny[1]), s3_dataset="s3://bucket/ds"))
    with pytest.raises(ValueError, match="max_samples"):
        bench_loader(LoaderBenchConfig(str(tiny[0]), str(tiny[1]), max_samples=0))
    with pytest.raises(ValueError, match="max_samples"):
        LoaderConfig(max_samples=0)
    with pytest.raises(ValueError, match="local_s3"):
        bench_loader(
            LoaderBenchConfig(
                str(tiny[0]), str(tiny[1]), s3_source="s3://b/src", s3_dataset="s3://b/ds", local_s3=True
            )
        )
    with pytest.raises(ValueError, match="local_s3"):  # a latency model needs the local server
        LoaderBenchConfig(str(tiny[0]), str(tiny[1]), s3_latency_ms=20)
    with pytest.raises(ValueError, match="s3_bandwidth_mb_s"):
        LoaderBenchConfig(local_s3=True, s3_bandwidth_mb_s=0)


def test_bench_loader_help_shows_the_config_defaults():
    """Every timed setting's default on the command line is the dataclass's, and --help says it."""
    text = run_cli("bench", "loader", "--help").stdout
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])  # one block per option
    help_of = {block.split()[0].rstrip(","): " ".join(block.split()) for block in options if block.strip()}
    defaults = LoaderBenchConfig()
    for flag, value in (
        ("--workers", defaults.workers),
        ("--batch-size", defaults.batch_size),
        ("--samples", defaults.samples),
        ("--repeat", defaults.repeat),
        ("--patches", defaults.patches),
        ("--max-samples", defaults.max_samples),
        ("--s3-latency-ms", defaults.s3_latency_ms),
        ("--s3-bandwidth-mb-s", defaults.s3_bandwidth_mb_s),
    ):
        assert help_of[flag].endswith(f"(default: {value})"), help_of[flag]
    from eossl.launch.cli import build_parser

    args = build_parser().parse_args(["bench", "loader"])
    assert (args.workers, args.batch_size, args.samples, args.repeat, args.patches, args.max_samples) == (
        defaults.workers,
        defaults.batch_size,
        defaults.samples,
        defaults.repeat,
        defaults.patches,
        defaults.max_samples,
    )
