"""Every command checks all of its inputs before it creates an output folder, an MLflow run or a job file.

Each mistake runs the real command (``main`` in this process, or the CLI in a subprocess) and asserts the
exit code 2, a message that says what is wrong and what to do, and that nothing was written. Also here:
evaluation of a run at a checkpoint (a killed or running job), exported with training's export code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eossl.ingest.format import READ_VERSIONS, UnsupportedFormatError
from eossl.ingest.integrity import manifest_digest, read_manifest
from eossl.ingest.storage import DatasetRoot
from eossl.launch.cli import main

from conftest import TINY_MOCO, cli_set, run_cli, training_env


def _fails(capsys, *argv: str) -> str:
    """Run ``eossl ARGV`` in this process; it must exit 2; returns its error output."""
    assert main(list(argv)) == 2
    return capsys.readouterr().err


# -- ingest ---------------------------------------------------------------------------------------------


def test_ingest_of_an_empty_folder_fails_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    err = _fails(capsys, "ingest", str(tmp_path / "src"), str(tmp_path / "ds"), "--no-progress")
    assert "no SEN12MS patches found" in err and "ROIs1158_spring_s1_1_p30.tif" in err and "empty" in err
    assert not (tmp_path / "ds").exists()


def test_ingest_of_downloaded_archives_says_to_extract_them(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for mod in ("s1", "s2", "lc"):
        (src / f"ROIs1158_spring_{mod}.tar.gz").write_bytes(b"\x1f\x8b not extracted")
    err = _fails(capsys, "ingest", str(src), str(tmp_path / "ds"), "--no-progress")
    assert "3 archives" in err and "extract them" in err and "tar xzf ROIs1158_spring_lc.tar.gz" in err
    assert not (tmp_path / "ds").exists()


# -- what a path that is not a dataset is -------------------------------------------------------------


def test_verify_says_what_a_path_is(tmp_path, capsys, synthetic_source):
    err = _fails(capsys, "verify", str(tmp_path / "typo"))
    assert "does not exist" in err and "ingest did not finish" not in err
    err = _fails(capsys, "verify", str(synthetic_source))
    assert "looks like a SEN12MS source tree" in err and "run `eossl ingest" in err
    unfinished = tmp_path / "unfinished"
    (unfinished / "_progress").mkdir(parents=True)
    (unfinished / "_progress" / "plan.json").write_text("{}")
    err = _fails(capsys, "verify", str(unfinished))
    assert "unfinished ingest" in err and "resume" in err
    (tmp_path / "other").mkdir()
    assert "not an eossl dataset" in _fails(capsys, "verify", str(tmp_path / "other"))


@pytest.mark.slow
def test_train_on_a_source_tree_fails_before_the_run_folder(tmp_path, synthetic_source):
    run = tmp_path / "run"
    proc = run_cli(
        "train", "moco", "--data", str(synthetic_source), "--out", str(run), check=False, env=training_env()
    )
    assert proc.returncode == 2, proc.stderr
    assert "looks like a SEN12MS source tree" in proc.stderr and "eossl ingest" in proc.stderr
    assert not run.exists()


@pytest.mark.slow
def test_a_failed_start_leaves_no_run_folder(tmp_path, dataset):
    """A model name is checked when the model is built, after the run folder is locked: the folder the
    failed start created is removed again."""
    run = tmp_path / "run"
    args = ["train", "moco", "--data", str(dataset), "--out", str(run)]
    proc = run_cli(*args, *cli_set({**TINY_MOCO, "backbone": "no_such_net"}), check=False, env=training_env())
    assert proc.returncode == 2 and "Unknown model (no_such_net)" in proc.stderr
    assert not run.exists()


# -- format versions ----------------------------------------------------------------------------------


def _set_manifest_version(dataset: Path, version: int) -> None:
    """A manifest of another format version, with a valid digest (as that version's writer would make)."""
    path = dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = version
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def test_readers_refuse_a_format_version_they_do_not_know(copy_of_dataset, capsys):
    from eossl.streaming.inputs import InputSpec
    from eossl.streaming.loader import LoaderConfig, SSLLoader
    from eossl.streaming.zarr_dataset import ZarrPatchDataset

    assert read_manifest(DatasetRoot(str(copy_of_dataset)))["format_version"] in READ_VERSIONS
    unknown = max(READ_VERSIONS) + 1
    _set_manifest_version(copy_of_dataset, unknown)
    readable = ", ".join(map(str, READ_VERSIONS))
    message = rf"format_version {unknown}, but this eossl reads version {readable} only"
    with pytest.raises(UnsupportedFormatError, match=message):
        read_manifest(DatasetRoot(str(copy_of_dataset)))
    with pytest.raises(UnsupportedFormatError, match=message):
        SSLLoader(str(copy_of_dataset), LoaderConfig(batch_size=1, device="cpu"))
    with pytest.raises(UnsupportedFormatError, match=message):
        ZarrPatchDataset(str(copy_of_dataset), InputSpec.parse("s2"))
    assert main(["verify", str(copy_of_dataset)]) == 1
    assert "manifest.json" in capsys.readouterr().out

    # The Zarr store's own version is checked too (a store copied in from another dataset).
    _set_manifest_version(copy_of_dataset, max(READ_VERSIONS))
    zarr_json = copy_of_dataset / "data.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    meta["attributes"]["format_version"] = unknown
    zarr_json.write_text(json.dumps(meta))
    with pytest.raises(UnsupportedFormatError, match=r"data\.zarr: .*format_version"):
        ZarrPatchDataset(str(copy_of_dataset), InputSpec.parse("s2"))
    assert main(["verify", str(copy_of_dataset)]) == 1
    assert "data.zarr" in capsys.readouterr().out


# -- cluster jobs ---------------------------------------------------------------------------------------


def test_kit_refuses_a_misspelt_training_key_before_writing(tmp_path, capsys):
    job = tmp_path / "job.sbatch"
    argv = ["kit", "slurm", "--out", str(job), "--", "moco", "--data", "D", "--out", "R", "--set", "szie=64"]
    err = _fails(capsys, *argv)
    assert "unknown config key 'szie'" in err and "loader.size" in err
    assert not job.exists()
    argv[-1] = "size=64"
    assert main(argv) == 0 and job.exists()


def _study(tmp_path: Path, dataset: Path, **train) -> Path:
    import yaml

    study = {
        "name": "s",
        "data": str(dataset),
        "out": str(tmp_path / "study"),
        "train": {**TINY_MOCO, **train},
        "grid": {"batch_size": [8, 16]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_resolves_every_cell_before_emitting_jobs(tmp_path, dataset, capsys):
    path = _study(tmp_path, dataset, szie=64)
    err = _fails(capsys, "study", "--config", str(path), "--emit", "slurm")
    assert "study cell batch_size-8: unknown config key 'szie'" in err and "loader.size" in err
    assert not (tmp_path / "study").exists()
    err = _fails(capsys, "study", "--config", str(path), "--set", "train.szie=64", "--list")
    assert "szie" in err


def test_study_checks_dataset_and_budget_before_training(tmp_path, dataset, capsys):
    path = _study(tmp_path, dataset)
    err = _fails(capsys, "study", "--config", str(path), "--set", "eval.budget=999")
    assert "budget_999_seed0 not in" in err and "this dataset has budgets 2 (seeds 0,1)" in err
    err = _fails(capsys, "study", "--config", str(path), "--set", f"data={tmp_path / 'nowhere'}")
    assert "does not exist" in err
    assert not (tmp_path / "study").exists()


def test_study_list_shows_resolved_full_keys(tmp_path, dataset, capsys):
    path = _study(tmp_path, dataset, momentum=0.99)
    err = _fails(capsys, "study", "--config", str(path), "--list")
    assert "ambiguous" in err and "moco.momentum" in err and "optim.momentum" in err
    path = _study(tmp_path, dataset, **{"moco.momentum": 0.99})
    assert main(["study", "--config", str(path), "--list"]) == 0
    out = capsys.readouterr().out
    assert "resolved: " in out and "moco.momentum=0.99" in out and "loader.size=64" in out
    assert "batch_size=16" in out and not (tmp_path / "study").exists()


# -- evaluation -----------------------------------------------------------------------------------------


def _eval(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "classify", "--dataset", str(dataset), "--out", str(out), "--inputs", "s2", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--budget", "999"), "budget_999_seed0 not in"),
        (("--budget", "2", "--seeds", "0,7"), "budget_2_seed7 not in"),
        (("--budget", "2", "--inputs", "s3"), "input must be one of"),
        (("--budget", "2", "--set", "label=lccs"), "label must be one of"),
    ],
)
def test_eval_refuses_bad_inputs_before_any_run(tmp_path, dataset, capsys, extra, message):
    out = tmp_path / "eval"
    err = _fails(capsys, *_eval(dataset, out, "--init", "random", *extra))
    assert message in err
    assert not out.exists()  # no results, no MLflow store, no run


def test_eval_refuses_what_is_not_a_run_or_checkpoint(tmp_path, dataset, capsys):
    out = tmp_path / "eval"
    (tmp_path / "notarun").mkdir()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "notarun"): "holds no config.yaml, checkpoint or backbone/",
    }
    for path, message in cases.items():
        err = _fails(capsys, *_eval(dataset, out, "--budget", "2", "--checkpoint", path))
        assert message in err and "RUN/checkpoints/step-N" in err
    started = tmp_path / "started"  # a run folder that has not saved a step yet
    started.mkdir()
    (started / "config.yaml").write_text("method: moco\n")
    err = _fails(capsys, *_eval(dataset, out, "--budget", "2", "--checkpoint", str(started)))
    assert "no checkpoint yet" in err
    assert not out.exists()
    err = _fails(capsys, *_eval(tmp_path / "missing-ds", out, "--checkpoint", str(started)))
    assert "does not exist" in err and not out.exists()


@pytest.fixture(scope="module")
def killed_run(dataset, module_tmp) -> Path:
    """A 3-step MoCo run with checkpoints at steps 2 and 3, and its final export."""
    run = module_tmp("runs") / "moco"
    args = ["train", "moco", "--data", str(dataset), "--out", str(run), "--max-steps", "3"]
    values = cli_set({**TINY_MOCO, "ckpt_every": "2", "log_every": "1"})
    run_cli(*args, *values, env=training_env(), cwd=run.parent, timeout=1500)  # its store: beside the run
    return run


@pytest.mark.slow
def test_a_run_without_export_is_evaluated_at_its_latest_checkpoint(
    killed_run, tmp_path, dataset, capsys, monkeypatch
):
    """Its latest checkpoint, exported by evaluation, is the backbone training itself exported, bit for bit;
    a named intermediate checkpoint is another model; the grid runs on both and names the rows by step."""
    import mlflow

    from eossl.eval.checkpoints import checkpoint_source, export_checkpoint
    from eossl.eval.tracking import pretrain_run_id

    killed = Path(shutil.copytree(killed_run, tmp_path / "killed"))
    shutil.rmtree(killed / "backbone")  # as a job killed before its end leaves it
    source = checkpoint_source(str(killed))
    assert source.step == 3 and source.name == "killed-step-3"
    folder = export_checkpoint(source, tmp_path / "exports", str(dataset))
    exported = folder / "backbone" / "backbone.safetensors"
    assert exported.read_bytes() == (killed_run / "backbone" / "backbone.safetensors").read_bytes()
    card = json.loads((folder / "backbone" / "model_card.json").read_text())
    assert card == json.loads((killed_run / "backbone" / "model_card.json").read_text())
    # The export names the pre-training run: its evaluation links it without the run's checkpoints.
    run_id = json.loads((killed / "checkpoints" / "step-0000003" / "trainer.json").read_text())[
        "mlflow_run_id"
    ]
    assert run_id and card["mlflow_run_id"] == run_id and pretrain_run_id(folder) == run_id

    step2 = killed_run / "checkpoints" / "step-0000002"
    assert checkpoint_source(str(step2)).step == 2
    out = tmp_path / "eval"
    argv = [*_eval(dataset, out, "--budget", "2", "--init", "checkpoint", "--checkpoint", str(step2))]
    argv += ["--checkpoint", str(killed)]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The command in this process (torch is imported already): what is checked is what it exports and logs.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "moco-step-2" in stdout and "killed-step-3" in stdout
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("eossl-eval")
    linked = {
        c.data.tags["eossl.eval.method"]: c.data.tags.get("eossl.pretrain_run_id")
        for c in client.search_runs([exp.experiment_id], "tags.`eossl.eval.cell` = '1'")
    }
    assert linked == {"moco-step-2": run_id, "killed-step-3": run_id}  # each exported checkpoint's cells
    early = (out / "backbones" / "moco-step-2" / "backbone" / "backbone.safetensors").read_bytes()
    assert early != exported.read_bytes()
    cells = json.loads((out / "cells.json").read_text())
    assert {c["method"] for c in cells} == {"moco-step-2", "killed-step-3"}
    assert all(c["mean"] is not None for c in cells)


@pytest.mark.slow
def test_training_repeats_bit_for_bit_on_one_machine(killed_run, dataset, tmp_path):
    """The same command twice on one machine: the same losses at every step and the same backbone bytes
    (data order, augmentation and initialisation come from the seed; README, "Repeatability")."""
    run = tmp_path / "again"
    args = ["train", "moco", "--data", str(dataset), "--out", str(run), "--max-steps", "3"]
    values = cli_set({**TINY_MOCO, "ckpt_every": "2", "log_every": "1"})
    run_cli(*args, *values, env=training_env(), cwd=tmp_path, timeout=1500)  # its store: outside the checkout

    def losses(folder: Path) -> list[tuple[int, float]]:
        lines = (folder / "history.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    assert losses(run) == losses(killed_run) and len(losses(run)) == 3
    name = "backbone/backbone.safetensors"
    assert (run / name).read_bytes() == (killed_run / name).read_bytes()
