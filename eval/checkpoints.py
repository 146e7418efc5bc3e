"""What ``--checkpoint`` names, checked before any cell runs: a pre-training run or one of its checkpoints.

Three things are accepted: a finished run folder (its exported ``backbone/``), a run folder without an
export (a killed or still running job: its latest checkpoint), or one checkpoint folder
``RUN/checkpoints/step-N`` (an intermediate state). A checkpoint is exported on the fly with training's
own export code (model built from the run's ``config.yaml``, weights from ``model.pt``), into
``OUT/backbones/<run>-step-N/backbone/``, so evaluation reads every backbone the same way and the export
is reused by a re-run. Anything else is refused with what was expected, before a run or folder is made.

Weights that are not an eossl run are evaluated as rows too: ``timm:NAME`` (timm's pretrained weights,
from the local cache only; an RGB network takes S2 B4, B3, B2) or a weights file with the input it was
trained on, ``FILE@INPUT[@ARCH]`` (``resnet50_sentinel2_all_moco-df8b932e.pth@ssl4eo_s2``; INPUT is one of
``train.weights.WEIGHTS_INPUTS``, ARCH the timm architecture, else the longest timm model name the file
name starts with, as torchgeo names its files). They are exported once into
``OUT/backbones/<name>/backbone/`` with a model card naming their channels and normalisation, so every
task reads them like a pre-training run.
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
    weights: str | None = None
    weights_input: str | None = None
    arch: str | None = None

    @property
    def name(self) -> str:
        """The folder evaluated: the run's own, ``<run>-step-N`` for a checkpoint, or the weights' name."""
        if self.weights is not None:
            if self.weights.startswith("timm:"):
                return "timm-" + self.weights.removeprefix("timm:")
            return Path(self.weights).stem + (f"-{self.weights_input}" if self.weights_input else "")
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

    weights = _weights_source(given)
    if weights is not None:
        return weights
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


def _arch_from_name(path: Path) -> str | None:
    """The longest timm architecture the file name starts with (torchgeo: ``resnet50_sentinel2_...``)."""
    import timm

    stem = path.name.lower()
    names = [n for n in timm.list_models() if stem.startswith(n + "_") or stem.startswith(n + "-")]
    return max(names, key=len) if names else None


def _weights_source(given: str) -> BackboneSource | None:
    """A ``timm:NAME`` or ``FILE@INPUT[@ARCH]`` value, checked (the file or cache entry is there); None
    for anything else."""
    from eossl.train.weights import WEIGHT_SUFFIXES, WEIGHTS_INPUTS, timm_weights_file

    if given.startswith("timm:"):
        timm_weights_file(given.removeprefix("timm:"))  # raises with where the file goes when it is not here
        return BackboneSource(given, Path(given), None, None, weights=given)
    head, _, rest = ("", "", "") if Path(given).exists() else given.partition("@")
    head = head or given
    path = Path(head)
    if not (path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)):
        if rest:
            raise ValueError(
                f"--checkpoint {given}: {head} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})"
            )
        return None
    if (path.parent / "model_card.json").is_file() and path.parent.name == "backbone":
        return BackboneSource(given, path.parent.parent, None, None)  # an eossl run's exported weights
    weights_input, _, arch = rest.partition("@")
    if weights_input not in WEIGHTS_INPUTS or weights_input == "unknown":
        raise ValueError(
            f"--checkpoint {given}: name the input the weights were trained on, {head}@INPUT[@ARCH] with "
            f"INPUT one of {', '.join(w for w in WEIGHTS_INPUTS if w != 'unknown')}"
        )
    arch = arch or _arch_from_name(path)
    if not arch:
        raise ValueError(f"--checkpoint {given}: name the timm architecture, {head}@{weights_input}@ARCH")
    return BackboneSource(given, path, None, None, weights=head, weights_input=weights_input, arch=arch)


def export_checkpoint(source: BackboneSource, out: Path, dataset: str) -> Path:
    """The folder holding ``backbone/`` for ``source``: the run's own, or an export of its checkpoint
    under ``out/backbones/`` (reused when already there).

    ``dataset`` gives the normalisation for the model card when the run's own dataset is not readable here.
    """
    if source.checkpoint is None and source.weights is None:
        return source.run_dir
    from eossl.train.export import MODEL_CARD

    folder = Path(out) / "backbones" / source.name
    if (folder / MODEL_CARD).exists():
        return folder
    if source.weights is not None:
        _export_weights(source, folder, dataset)
    else:
        _export(source, folder, dataset)
    return folder


def _spec_of(channels: list[str]):
    """The ``InputSpec`` whose channels are ``channels`` (S1 before S2, as every eossl input)."""
    from eossl.streaming.inputs import InputSpec

    sensors = tuple(s for s in ("s1", "s2") if any(c.startswith(f"{s}:") for c in channels))
    bands = tuple(c.split(":", 1)[1] for c in channels if c.startswith("s2:")) or "land"
    spec = InputSpec(sensors=sensors, s2_bands=bands)
    if spec.channel_names != list(channels):
        raise ValueError(f"channels {channels} are not an eossl input layout (S1 VV, VH, then S2 bands)")
    return spec


def _export_weights(source: BackboneSource, folder: Path, dataset: str) -> None:
    """Load the weights into their timm architecture and export it with a card naming their input."""
    from types import SimpleNamespace

    from eossl.ingest.integrity import read_manifest
    from eossl.ingest.storage import DatasetRoot
    from eossl.streaming.views import ViewConfig, ViewSet
    from eossl.train.backbones import build_encoder
    from eossl.train.config import BackboneConfig, TrainConfig
    from eossl.train.export import export_backbone
    from eossl.train.input_norm import input_norm
    from eossl.train.vit import is_vit
    from eossl.train.weights import load_into_backbone, read_starting_weights

    weights = read_starting_weights(source.weights, source.weights_input)
    if weights.channels is None:
        raise ValueError(f"--checkpoint {source.given}: the weights' channels are unknown; add @INPUT")
    arch = source.arch or weights.timm_model
    spec = _spec_of(weights.channels)
    backbone = BackboneConfig(name=arch, weights=source.weights, weights_input=source.weights_input)
    encoder = build_encoder(backbone, {"input": spec.channels})
    if is_vit(encoder.backbone):  # evaluation feeds whole patches, not the architecture's own size
        encoder = build_encoder(backbone, {"input": spec.channels}, dynamic_img_size=True)
    report = {
        **weights.describe(),
        **load_into_backbone(encoder.backbone, weights, spec.channel_names, spec.channels),
    }
    manifest = read_manifest(DatasetRoot(dataset))
    views = ViewSet(ViewConfig(mode="single", inputs=spec))
    norm = input_norm([spec.channel_names] * 2, [spec.normalisation(manifest)] * 2, "auto", weights)
    cfg = TrainConfig(method="moco", data=dataset, out=str(folder), backbone=backbone)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    out = export_backbone(encoder, SimpleNamespace(views=views, manifest=manifest), cfg, 0, tmp, norm, report)
    card = json.loads((out / "model_card.json").read_text())
    card["method"] = f"pretrained weights ({weights.kind}: {source.given})"
    card["dataset"] = None
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)


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
    from eossl.train.input_norm import saved_input_norm
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
    norm, starting = saved_input_norm(source.run_dir)  # the normalisation the run trained with
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    run_id = json.loads((source.checkpoint / "trainer.json").read_text()).get("mlflow_run_id")
    # the card names the run and the normalisation it trained with
    export_backbone(method.backbone(), loader, cfg, source.step or 0, tmp, norm, starting, run_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
