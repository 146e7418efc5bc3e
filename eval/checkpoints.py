"""What ``--checkpoint`` names, checked before any cell runs: a pre-training run or one of its checkpoints.

Three things are accepted: a finished run folder (its exported ``backbone/``), a run folder without an
export (a killed or still running job: its latest checkpoint), or one checkpoint folder
``RUN/checkpoints/step-N`` (an intermediate state). A checkpoint is exported on the fly with training's
own export code (model built from the run's ``config.yaml``, weights from ``model.pt``), into
``OUT/backbones/<run>-step-N/backbone/``, so evaluation reads every backbone the same way and the export
is reused by a re-run. Anything else is refused with what was expected, before a run or folder is made.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BackboneSource", "checkpoint_source", "export_checkpoint"]

_EXPECTED = (
    "expected a pre-training run folder (written by `eossl train`: config.yaml, checkpoints/, "
    "backbone/ once finished) or one of its checkpoints (RUN/checkpoints/step-N)"
)


@dataclass(frozen=True)
class BackboneSource:
    """Where one ``--checkpoint`` value's backbone comes from.

    Attributes:
        given: the path as given.
        run_dir: the pre-training run folder (its config.yaml).
        checkpoint: the checkpoint folder to export, or None when the run's own export is used.
        step: the checkpoint's step (None: the run's final export).
    """

    given: str
    run_dir: Path
    checkpoint: Path | None
    step: int | None

    @property
    def name(self) -> str:
        """The folder evaluated: the run's own, or ``<run>-step-N`` for a checkpoint."""
        if self.checkpoint is None:
            return self.run_dir.resolve().name
        return f"{self.run_dir.resolve().name}-step-{self.step}"


def _step(checkpoint: Path) -> int:
    trainer = checkpoint / "trainer.json"
    try:
        return int(json.loads(trainer.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"--checkpoint {checkpoint}: {trainer} unreadable ({exc}): incomplete checkpoint"
        ) from exc


def checkpoint_source(given: str) -> BackboneSource:
    """Classify one ``--checkpoint`` value without loading any weights.

    Raises:
        ValueError: the path does not exist, or is neither a run folder nor a complete checkpoint, with
            what was expected.
    """
    from eossl.train.checkpoint import CheckpointError, latest_checkpoint
    from eossl.train.export import MODEL_CARD

    path = Path(given)
    if not path.exists():
        raise ValueError(f"--checkpoint {given} does not exist; {_EXPECTED}")
    if not path.is_dir():
        raise ValueError(f"--checkpoint {given} is a file; {_EXPECTED}")
    if (path / "trainer.json").exists() or (path / "model.pt").exists():  # RUN/checkpoints/step-N
        run_dir = path.parent.parent
        if path.parent.name != "checkpoints" or not (run_dir / "config.yaml").exists():
            raise ValueError(
                f"--checkpoint {given}: a checkpoint outside a run folder (no ../../config.yaml)"
            )
        for part in ("trainer.json", "model.pt"):
            if not (path / part).exists():
                raise ValueError(f"--checkpoint {given}: {part} missing: incomplete checkpoint")
        return BackboneSource(given, run_dir, path, _step(path))
    if (path / MODEL_CARD).exists():
        return BackboneSource(given, path, None, None)
    if (path / "config.yaml").exists():
        try:
            latest = latest_checkpoint(path)
        except CheckpointError as exc:
            raise ValueError(f"--checkpoint {given}: {exc}") from exc
        if latest is None:
            raise ValueError(
                f"--checkpoint {given}: a run folder with no checkpoint yet and no exported backbone "
                "(the run has not saved a step)"
            )
        if not (latest / "model.pt").exists():
            raise ValueError(f"--checkpoint {given}: {latest / 'model.pt'} missing: incomplete checkpoint")
        return BackboneSource(given, path, latest, _step(latest))
    raise ValueError(f"--checkpoint {given} holds no config.yaml, checkpoint or backbone/; {_EXPECTED}")


def export_checkpoint(source: BackboneSource, out: Path, dataset: str) -> Path:
    """The folder holding ``backbone/`` for ``source``: the run's own, or an export of its checkpoint
    under ``out/backbones/`` (reused when already there).

    ``dataset`` gives the normalisation for the model card when the run's own dataset is not readable here.
    """
    if source.checkpoint is None:
        return source.run_dir
    from eossl.train.export import MODEL_CARD

    folder = Path(out) / "backbones" / source.name
    if (folder / MODEL_CARD).exists():
        return folder
    _export(source, folder, dataset)
    return folder


def _export(source: BackboneSource, folder: Path, dataset: str) -> None:
    """Rebuild the method from the run's config, load the checkpoint's weights, export its backbone."""
    from types import SimpleNamespace

    import yaml

    from eossl.ingest.integrity import read_manifest
    from eossl.ingest.storage import DatasetRoot
    from eossl.streaming.views import ViewSet
    from eossl.train.checkpoint import load_tensor_file
    from eossl.train.config import load_config
    from eossl.train.export import export_backbone
    from eossl.train.methods import get_method

    saved = yaml.safe_load((source.run_dir / "config.yaml").read_text())
    cfg = load_config(saved["method"], str(source.run_dir / "config.yaml"), {})
    method_cls = get_method(cfg.method)
    views = method_cls.views(cfg)
    view_set = ViewSet(views)
    channels = [view_set.channels(v) for v in range(len(view_set.views))]
    method = method_cls.build(cfg, channels, views.mode)
    method.load_state_dict(load_tensor_file(source.checkpoint / "model.pt"))
    try:
        manifest = read_manifest(DatasetRoot(cfg.data))
    except (FileNotFoundError, ValueError):  # the run's dataset lives elsewhere: same data, other path
        manifest = read_manifest(DatasetRoot(dataset))
    loader = SimpleNamespace(views=view_set, manifest=manifest)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    run_id = json.loads((source.checkpoint / "trainer.json").read_text()).get("mlflow_run_id")
    export_backbone(method.backbone(), loader, cfg, source.step or 0, tmp, run_id)  # the card names the run
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
