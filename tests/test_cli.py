"""The real ``eossl`` command end to end: help, sample data -> ingest -> verify, exit codes, bench; help texts
show the dataclass defaults, and building the command line imports no stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eossl.ingest.cli import default_of, shown
from eossl.launch.cli import build_parser, main

from conftest import run_cli


@pytest.mark.slow
def test_help_lists_subcommands():
    out = run_cli("--help").stdout
    for cmd in ("sample-data", "ingest", "verify", "bench"):
        assert cmd in out
    assert "merge" in run_cli("ingest", "--help").stdout


@pytest.mark.slow
def test_sample_data_ingest_verify_and_tamper(tmp_path):
    src, ds = tmp_path / "src", tmp_path / "ds"
    assert "wrote 24 GeoTIFFs" in run_cli("sample-data", str(src), "--patches", "8", "--seed", "3").stdout
    proc = run_cli(
        "ingest",
        str(src),
        str(ds),
        "--workers",
        "2",
        "--shard-size",
        "8MB",
        "--budgets",
        "2",
        "--holdout-fraction",
        "0.5",
    )
    assert "8 patches found, 8 written, 0 rejected" in proc.stdout
    assert "patch/s" in proc.stderr  # the progress bar reports rate and ETA
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["command"][:2] == ["eossl", "ingest"]
    assert len(manifest["shards"]) == 3  # 3 samples per 8 MB shard
    assert manifest["counts"]["with_lc"] == 8 and manifest["labels"]["with_labels"] == 8
    assert run_cli("verify", str(ds), "--deep").returncode == 0

    shard = ds / manifest["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("verify", str(ds), check=False)
    assert proc.returncode == 1 and "shard-000001.tar" in proc.stdout and "sha256" in proc.stdout


@pytest.mark.slow
def test_bad_usage_exit_codes(tmp_path):
    assert run_cli("ingest", "a", "b", "--part", "3/2", check=False).returncode == 2
    assert run_cli("ingest", "a", "b", "--shard-size", "big", check=False).returncode == 2
    assert run_cli("frobnicate", check=False).returncode == 2


@pytest.mark.slow
def test_bench_ingest_json(tmp_path):
    proc = run_cli("bench", "ingest", "--patches", "4", "--repeat", "1", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patches"] == 4
    for key in ("ingest_wds", "ingest_wds+zarr"):
        row = result[key]
        assert row["patches_per_s"] > 0 and row["ratio_vs_bare_read"] > 0
        assert row["shard_bytes_per_sample"] > 2_400_000  # raw arrays: s1 + s2 + lc
    assert (
        result["ingest_wds+zarr"]["zarr_bytes_per_sample"]
        < result["ingest_wds+zarr"]["shard_bytes_per_sample"]
    )


def test_help_of_data_and_launch_commands_imports_no_torch():
    """Mounting a command imports nothing until it runs: ``eossl --help`` and the ingest and launch
    commands' help stay instant (torch alone takes seconds to import)."""
    commands = [
        ["--help"],
        ["ingest", "--help"],
        ["ingest", "merge", "--help"],
        ["sample-data", "--help"],
        ["verify", "--help"],
        ["kit", "--help"],
        ["study", "--help"],
        ["mlflow", "serve", "--help"],
    ]
    script = (
        "import contextlib, io, sys\n"
        "from eossl.launch.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert 'torch' not in sys.modules, f'eossl {\" \".join(argv)} imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_kit_and_study_list_resolve_configs_without_importing_torch(tmp_path):
    """Writing a job file and listing a study's cells resolve every training config (DINO's recipe
    included) but import no torch: on a cluster's network file system that alone takes many seconds."""
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: s\ndata: /nowhere/ds\nout: /nowhere/study\nmethod: dino\n"
        "train: {batch_size: 8}\ngrid: {batch_size: [8, 16]}\n"
    )
    commands = [
        ["kit", "slurm", "--out", str(tmp_path / "moco.sbatch"), "--", "moco", "--data", "D", "--out", "R"],
        ["kit", "k8s", "--out", str(tmp_path / "dino.yaml"), "--", "dino", "--data", "D", "--out", "R"],
        ["study", "--config", str(study), "--list"],
    ]
    script = (
        "import contextlib, io, sys\n"
        "from eossl.launch.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        assert main(argv) == 0, argv\n"
        "    assert 'torch' not in sys.modules, f'eossl {\" \".join(argv)} imported torch'\n"
        "    print(out.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resolved: batch_size=16" in proc.stdout  # each cell's config was resolved, not skipped
    assert (tmp_path / "moco.sbatch").exists() and (tmp_path / "dino.yaml").exists()


def test_each_methods_recipe_is_the_one_declared_in_the_registry():
    from eossl.train.methods import CONFIG_DEFAULTS, get_method, method_names

    assert set(CONFIG_DEFAULTS) == set(method_names())
    for name in method_names():
        assert dict(get_method(name).config_defaults) == dict(CONFIG_DEFAULTS[name])


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_help_shows_the_dataclass_defaults_and_flags_not_given_are_not_passed(capsys, monkeypatch):
    from eossl.ingest.config import IngestConfig, default_workers
    from eossl.ingest.read import ReadOptions
    from eossl.ingest.sample_data import write_sample_data
    from eossl.launch.cluster import ClusterJob
    from eossl.launch.mlflow_server import ServerConfig

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no value is wrapped
    cfg, read = IngestConfig("src", "ds"), ReadOptions()
    ingest = _help(capsys, "ingest")
    for value in (
        cfg.workers,
        cfg.zarr_shard_samples,
        read.required,
        read.max_s1_invalid_fraction,
        read.multilabel_threshold,
        cfg.split.holdout_fraction,
        cfg.split.seed,
        cfg.split.budgets,
        cfg.split.budget_seeds,
        cfg.formats,
    ):
        assert f"(default {shown(value)}" in ingest or f"; default {shown(value)}" in ingest, value
    assert f"default {cfg.shard_bytes // 10**6}MB;" in ingest and "default 0/1)" in ingest
    assert f"(default {default_workers()})" in _help(capsys, "ingest", "merge")
    sample = _help(capsys, "sample-data")
    for name in ("patches", "seed", "patches_per_scene"):
        assert f"(default {default_of(write_sample_data, name)})" in sample
    job = ClusterJob(train_args=("moco",))
    kit = _help(capsys, "kit")
    for value in (
        job.nodes,
        job.gpus_per_node,
        job.accelerate_config,
        job.repo,
        job.site.slurm.time,
        job.signal_seconds,
        job.site.k8s.image,
        job.runs_claim,
        job.job_name,
    ):
        assert f"default {value})" in kit, value
    serve = _help(capsys, "mlflow", "serve")
    server = ServerConfig()
    for value in (server.folder, server.host, server.port, server.workers):
        assert f"default {value})" in serve, value
    # Flags the user did not give are absent, so the dataclass defaults apply.
    args = build_parser(["ingest"]).parse_args(["ingest", "a", "b"])
    assert set(vars(args)) == {"command", "source", "dataset", "holdout_scenes", "no_progress", "handler"}
    args = build_parser(["kit"]).parse_args(["kit", "slurm"])
    assert set(vars(args)) == {"command", "kind", "out", "handler", "train_args"}
