"""``eossl study``: run a scaling study cell by cell, resumably, with every cell a nested MLflow run.

Layout of ``STUDY_OUT``::

    study.json                 parent MLflow run id and the study's digest
    cells/<cell>/cell.json     the cell's MLflow run id, attempts and finished evaluations
    cells/<cell>/run/          the pre-training run (checkpoints, history.jsonl, backbone/)
    cells/<cell>/train.log     the training process's output (appended over attempts)
    cells/<cell>/eval/<protocol>/   results.csv/.md of the cell's evaluation
    results.csv, results.md, *.png   the study table and plots (``eossl study report``)

Re-running the same command is the resume: a cell whose evaluation finished is skipped; a cell whose
training stopped resumes from its last checkpoint into the same MLflow run (``EOSSL_MLFLOW_RUN_ID``); an
evaluation that was interrupted is redone and its unfinished MLflow run marked KILLED, so every cell ends
with exactly one finished training run and one finished evaluation per protocol.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from eossl.train.preemption import DATA_UNAVAILABLE_EXIT_CODE, EXIT_FILE_ENV, PREEMPTED_EXIT_CODE

from .config import Cell, StudyConfig

__all__ = [
    "StudyError",
    "StudyInterrupted",
    "emit_cluster_jobs",
    "run_study",
    "study_tracking_uri",
    "train_command",
]

PARENT_TAG = "eossl.study"
CELL_TAG = "eossl.study.cell"
EVAL_TAG = "eossl.study.eval"


class StudyError(RuntimeError):
    """A cell failed; the message names the cell and its log."""


class StudyInterrupted(RuntimeError):
    """The study was asked to stop (SIGTERM/SIGINT) and its running cell checkpointed; re-run to resume."""


def study_tracking_uri(cfg: StudyConfig) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a team server), else a SQLite store in the study folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.out).resolve() / 'mlflow.db'}"


def _cell_dir(cfg: StudyConfig, cell: Cell) -> Path:
    return Path(cfg.out) / "cells" / cell.name


def _load_json(path: Path, default: dict) -> dict:
    return json.loads(path.read_text()) if path.exists() else default


def write_json_atomic(path: Path, data: dict) -> None:
    """``train.checkpoint.write_json_atomic``, imported on use: that module brings torch, which listing the
    cells (``eossl study --list``) must not import."""
    from eossl.train.checkpoint import write_json_atomic as write

    write(path, data)


def train_command(cfg: StudyConfig, cell: Cell) -> list[str]:
    """The ``eossl.train`` arguments of a cell (after ``python -m eossl.train`` or ``accelerate launch
    -m``)."""
    args = [cfg.cell_method(cell), "--data", cfg.data, "--out", str(_cell_dir(cfg, cell) / "run")]
    for key, value in cfg.train_values(cell).items():
        args += ["--set", f"{key}={value}"]
    return args


def _launcher(cfg: StudyConfig) -> list[str]:
    if not cfg.launch.accelerate_config:
        return [sys.executable, "-m", "eossl.train"]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", cfg.launch.accelerate_config]
    if cfg.launch.num_processes:
        cmd += ["--num_processes", str(cfg.launch.num_processes)]
    return [*cmd, "--main_process_port", str(_free_port()), "-m", "eossl.train"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tracking:
    """The study's MLflow experiment, parent run and cell runs (created once, found again on re-runs)."""

    def __init__(self, cfg: StudyConfig):
        import mlflow

        from eossl.train.tracking import artifact_root

        self.cfg = cfg
        self.uri = study_tracking_uri(cfg)
        self.client = mlflow.MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment_name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                cfg.experiment_name, artifact_location=artifact_root(self.uri)
            )
        else:
            self.experiment_id = exp.experiment_id
        state_path = Path(cfg.out) / "study.json"
        state = _load_json(state_path, {})
        if state.get("digest") not in (None, cfg.digest()):
            raise ValueError(
                f"{cfg.out} holds study {state.get('name')!r} with other settings (digest "
                f"{state.get('digest')} vs {cfg.digest()}); use another out folder"
            )
        if state.get("tracking_uri") not in (None, self.uri):
            raise ValueError(
                f"{cfg.out} was tracked at {state['tracking_uri']}, now {self.uri}: set "
                "MLFLOW_TRACKING_URI as in the first run (or unset it for the study's own store)"
            )
        self.parent_id = state.get("parent_run_id")
        if self.parent_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"study {cfg.name}",
                tags={PARENT_TAG: cfg.name, "eossl.study.grid": json.dumps(cfg.grid)},
            )
            self.parent_id = run.info.run_id
            self.client.log_param(self.parent_id, "study_digest", cfg.digest())
            for key, values in cfg.grid.items():
                self.client.log_param(self.parent_id, f"grid.{key}", json.dumps(values))
            self.client.log_param(self.parent_id, "lr_rule", cfg.lr.rule)
            self.client.log_param(self.parent_id, "eval_protocols", ",".join(cfg.eval.protocols))
            write_json_atomic(
                state_path,
                {
                    "name": cfg.name,
                    "digest": cfg.digest(),
                    "parent_run_id": self.parent_id,
                    "tracking_uri": self.uri,
                    "experiment": cfg.experiment_name,
                },
            )
        else:
            self.client.update_run(self.parent_id, status="RUNNING")

    def cell_run(self, cell: Cell, state: dict) -> str:
        if state.get("run_id"):
            return state["run_id"]
        # A run created just before a kill, whose id never reached cell.json: use it rather than a second one.
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{CELL_TAG}` = '{cell.name}'"
            ),
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=cell.name,
            tags={
                "mlflow.parentRunId": self.parent_id,
                PARENT_TAG: self.cfg.name,
                CELL_TAG: cell.name,
                "eossl.study.values": json.dumps(cell.values, default=str),
            },
        )
        return run.info.run_id

    def kill_unfinished_evals(self, cell_run_id: str, protocol: str) -> int:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{cell_run_id}' and tags.`{EVAL_TAG}` = '{protocol}'",
        )
        stale = [r for r in runs if r.info.status != "FINISHED"]
        for r in stale:
            self.client.set_terminated(r.info.run_id, status="KILLED")
        return len(stale)


def _train_cell(cfg: StudyConfig, cell: Cell, run_id: str, uri: str, state: dict, state_path: Path) -> None:
    folder = _cell_dir(cfg, cell)
    cmd = [*_launcher(cfg), *train_command(cfg, cell)]
    # The ranks' own exit code: under ``accelerate launch`` a failed rank makes the launcher exit 1.
    exit_file = folder / ".train-exit-code"
    exit_file.unlink(missing_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "EOSSL_MLFLOW_RUN_ID": run_id,
        EXIT_FILE_ENV: str(exit_file),
    }
    state["train_attempts"] = state.get("train_attempts", 0) + 1
    write_json_atomic(state_path, state)
    log = folder / "train.log"
    with open(log, "a") as out:
        out.write(f"\n# attempt {state['train_attempts']}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        stop = _forward_signals(proc)
        try:
            code = proc.wait()
        finally:
            _restore_signals(stop)
    if code == PREEMPTED_EXIT_CODE or stop.get("signal"):
        raise StudyInterrupted(
            f"cell {cell.name}: training checkpointed and stopped; run the study again to resume (log: {log})"
        )
    if code != 0 and exit_file.exists() and exit_file.read_text().strip() == str(DATA_UNAVAILABLE_EXIT_CODE):
        code = DATA_UNAVAILABLE_EXIT_CODE
    if code == DATA_UNAVAILABLE_EXIT_CODE:
        raise StudyError(
            f"cell {cell.name}: the training data could not be read (storage unavailable or a reader process "
            f"died); training checkpointed first: run the study again to resume this cell (log: {log})"
        )
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise StudyError(f"cell {cell.name}: training failed with exit code {code}; log: {log}\n{tail}")


def _training_processes(proc: subprocess.Popen) -> list:
    """The processes that train: the child itself, or the ranks under an ``accelerate launch`` child (its
    launcher does not handle SIGUSR1, and answers SIGTERM by killing the ranks after a short grace)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        children = parent.children() if "accelerate" in " ".join(proc.args[:2]) else []
    except psutil.NoSuchProcess:
        return []
    return children or [parent]


def _forward_signals(proc: subprocess.Popen) -> dict:
    """SIGTERM/SIGINT to the study become SIGUSR1 to the training processes, which checkpoint and stop."""
    import psutil

    stop: dict = {"previous": {}}

    def handler(signum, _frame):
        stop["signal"] = signum
        for process in _training_processes(proc):
            try:
                process.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT):
        stop["previous"][signum] = signal.signal(signum, handler)
    return stop


def _restore_signals(stop: dict) -> None:
    for signum, previous in stop["previous"].items():
        signal.signal(signum, previous)


def _evaluate_cell(cfg: StudyConfig, cell: Cell, protocol: str, run_id: str, tracking: _Tracking) -> dict:
    folder = _cell_dir(cfg, cell)
    e = cfg.eval
    common = {
        "dataset": cfg.data,
        "out": str(folder / "eval" / protocol),
        "checkpoints": (str(folder / "run"),),
        "inputs": e.inputs,
        "s2_bands": e.s2_bands,
        "budget": e.budget,
        "protocol": protocol,
        "seeds": e.seeds,
        "label": e.label,
        "inits": e.inits,
        "experiment": cfg.experiment_name,
    }
    if e.task == "segment":
        from eossl.eval.segment import SegmentConfig, SegTrainConfig, run_segmentation

        run = run_segmentation
        eval_cfg = SegmentConfig(
            **common,
            train=SegTrainConfig(epochs=e.finetune_epochs, batch_size=e.batch_size),
            attention_patches=0,
        )
    else:
        from eossl.eval.classify import ClassifyConfig, run_classification
        from eossl.eval.probes import ProbeConfig

        run = run_classification
        eval_cfg = ClassifyConfig(
            **common,
            multilabel=e.multilabel,
            probe=ProbeConfig(batch_size=e.batch_size, finetune_epochs=e.finetune_epochs, workers=0),
        )
    killed = tracking.kill_unfinished_evals(run_id, protocol)
    if killed:
        print(
            f"  {cell.name}: {killed} interrupted {protocol} evaluation run(s) marked KILLED; "
            "evaluating again"
        )
    result = run(
        eval_cfg,
        ("eossl", "study", cfg.name, cell.name, protocol),
        parent_run_id=run_id,
        tags={EVAL_TAG: protocol, PARENT_TAG: cfg.name, CELL_TAG: cell.name},
    )
    scores = {}
    for row in result["cells"]:
        if row["mean"] is None:
            continue
        prefix = "eval" if row["init"] == "checkpoint" else f"eval_{row['init']}"
        key = f"{prefix}.{protocol}.{row['input']}.{row['metric']}"
        scores[key] = row["mean"]
        tracking.client.log_metric(run_id, key, row["mean"])
        tracking.client.log_metric(
            run_id, f"std.{key}", row["std"] or 0.0
        )  # over seeds: the plots' error bars
    return scores


def _run_cell(cfg: StudyConfig, cell: Cell, tracking: _Tracking, label: str) -> None:
    """Run one cell unless another process (a second ``eossl study``, a cluster job's ``--cell``) has it:
    ``flock`` on this node, and a lease with a heartbeat that a process on another node sees (``flock``
    on a network file system may be node-local)."""
    import fcntl

    from eossl.train.lease import Lease, LeaseHeld

    folder = _cell_dir(cfg, cell)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".cell.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"{label} {cell.name}: being run by another process, skipped")
            return
        try:
            lease = Lease(folder / ".cell.lease", what=f"study cell {cell.name}").acquire()
        except LeaseHeld as e:
            print(f"{label} {cell.name}: being run by another process ({e}), skipped")
            return
        try:
            _run_locked_cell(cfg, cell, tracking, label, folder)
        finally:
            lease.release()


def _run_locked_cell(cfg: StudyConfig, cell: Cell, tracking: _Tracking, label: str, folder: Path) -> None:
    state_path = folder / "cell.json"
    state = _load_json(state_path, {"name": cell.name, "values": cell.values})
    todo = [p for p in cfg.eval.protocols if p not in state.get("evaluated", {})]
    if not todo:
        print(f"{label} {cell.name}: finished, skipped")
        return
    state["run_id"] = tracking.cell_run(cell, state)
    state.pop("error", None)
    write_json_atomic(state_path, state)
    from eossl.train.export import MODEL_CARD

    t0 = time.perf_counter()
    try:
        if not (folder / "run" / MODEL_CARD).exists():
            print(f"{label} {cell.name}: pre-training ({folder / 'train.log'})", flush=True)
            _train_cell(cfg, cell, state["run_id"], tracking.uri, state, state_path)
        for protocol in todo:
            print(f"{label} {cell.name}: {protocol} evaluation", flush=True)
            try:
                scores = _evaluate_cell(cfg, cell, protocol, state["run_id"], tracking)
            except Exception as exc:  # noqa: BLE001 - any failure of one cell's evaluation stops that cell only
                traceback.print_exc()
                raise StudyError(f"cell {cell.name}: {protocol} evaluation failed: {exc!r}") from exc
            state.setdefault("evaluated", {})[protocol] = scores
            write_json_atomic(state_path, state)
    except StudyError as exc:
        state["error"] = str(exc)
        write_json_atomic(state_path, state)
        tracking.client.set_terminated(state["run_id"], status="FAILED")
        raise
    tracking.client.set_terminated(state["run_id"], status="FINISHED")
    print(
        f"{label} {cell.name}: done in {time.perf_counter() - t0:.0f} s {json.dumps(state['evaluated'])}",
        flush=True,
    )


def run_study(cfg: StudyConfig, only: tuple[str, ...] = ()) -> dict:
    """Run (or resume) every cell, or only the named ones, then write the report; returns its paths.

    A cell that fails (training or evaluation) is recorded (``cell.json`` error, MLflow run FAILED) and
    the study goes on with the next; ``failed`` in the result names them. A stop request (SIGTERM/SIGINT)
    ends the study after the running cell's checkpoint (:class:`StudyInterrupted`).
    """
    tracking_uri = study_tracking_uri(cfg)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the evaluations run in this process
    try:
        return _run_study(cfg, only, tracking_uri)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _run_study(cfg: StudyConfig, only: tuple[str, ...], tracking_uri: str) -> dict:
    from .report import write_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tracking = _Tracking(cfg)
    (out / "study.yaml").write_text(cfg.to_yaml())
    cells = [cfg.cell(name) for name in only] if only else cfg.cells()
    print(
        f"study {cfg.name}: {len(cfg.cells())} cells, MLflow {tracking_uri} (parent run {tracking.parent_id})"
    )
    failed: dict[str, str] = {}
    for index, cell in enumerate(cells, 1):
        try:
            _run_cell(cfg, cell, tracking, f"[{index}/{len(cells)}]")
        except StudyError as exc:
            print(f"[{index}/{len(cells)}] {cell.name}: FAILED: {exc}", flush=True)
            failed[cell.name] = str(exc)
    finished = all(
        set(cfg.eval.protocols) <= set(_load_json(_cell_dir(cfg, c) / "cell.json", {}).get("evaluated", {}))
        for c in cfg.cells()
    )
    report = write_report(
        tracking_uri, tracking.parent_id, out, cfg.plot, log_to_parent=finished, require_cells=False
    )
    if finished:
        tracking.client.set_terminated(tracking.parent_id, status="FINISHED")
    return {**report, "parent_run_id": tracking.parent_id, "finished": finished, "failed": failed}


def emit_cluster_jobs(cfg: StudyConfig, kind: str, jobs_dir: str, job_template) -> list[Path]:
    """One cluster job per unfinished cell (SLURM script or Kubernetes manifest), each training through the
    launch kit and then evaluating on node 0 with ``eossl study --cell``. The MLflow parent and cell runs
    are created now, so the jobs (and ``eossl study report``) find them through ``MLFLOW_TRACKING_URI``."""
    from dataclasses import replace

    from eossl.launch.cluster import render_k8s, render_slurm

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        print(
            "warning: MLFLOW_TRACKING_URI is not set: cluster jobs will use the study folder's SQLite store, "
            "which every node must see on a shared file system (a tracking server is the usual set-up)"
        )
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    tracking = _Tracking(cfg)
    (Path(cfg.out) / "study.yaml").write_text(cfg.to_yaml())
    folder = Path(jobs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cell in cfg.cells():
        cell_dir = _cell_dir(cfg, cell)
        cell_dir.mkdir(parents=True, exist_ok=True)
        state_path = cell_dir / "cell.json"
        state = _load_json(state_path, {"name": cell.name, "values": cell.values})
        if set(cfg.eval.protocols) <= set(state.get("evaluated", {})):
            continue
        state["run_id"] = tracking.cell_run(cell, state)
        write_json_atomic(state_path, state)
        name = f"{cfg.name}-{cell.name}".lower().replace("_", "-").replace(".", "-")[:52].strip("-")
        study_file = Path(cfg.out).resolve() / "study.yaml"
        after = f"eossl study --config {shlex.quote(str(study_file))} --cell {shlex.quote(cell.name)}"
        job = replace(
            job_template,
            train_args=tuple(train_command(cfg, cell)),
            job_name=name,
            after_train=after,
            env={
                **job_template.env,
                "MLFLOW_TRACKING_URI": tracking.uri,
                "EOSSL_MLFLOW_RUN_ID": state["run_id"],
            },
        )
        path = folder / (f"{cell.name}.sbatch" if kind == "slurm" else f"{cell.name}.yaml")
        path.write_text(render_slurm(job) if kind == "slurm" else render_k8s(job))
        written.append(path)
    return written
