"""Export of a trained backbone: a timm / Hugging Face model folder, and a model card saying what goes in.

``RUN_DIR/backbone/``:

- ``config.json`` + ``model.safetensors``: a timm model folder, so
  ``timm.create_model("local-dir:RUN_DIR/backbone", pretrained=True)`` builds the backbone with its weights
  (``num_classes=0``: pooled features) and ``timm.data.resolve_data_config(model=model)`` gives the
  per-channel ``mean``/``std`` eossl normalised with. They are in the dataset's stored units (S2:
  reflectance x 10,000, S1: dB clipped to the card's ``s1_clip``): feed float tensors of those values,
  ``(x - mean) / std`` per channel, never scaled to 0..1 first (timm divides only uint8 images by 255).
- ``backbone.safetensors``: the same tensors (a hard link where the filesystem allows), the name older
  exports and readers use; ``adapters.safetensors`` when 1x1 adapters were used.
- ``model_card.json`` (machine-readable) and ``README.md`` (bands, order, normalisation, how to load).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .backbones import Encoder
from .config import TrainConfig
from .input_norm import InputNorm, input_norm

__all__ = ["MODEL_CARD", "TIMM_CONFIG", "export_backbone", "read_model_card", "timm_config"]

MODEL_CARD = "backbone/model_card.json"  # inside a run folder
TIMM_CONFIG = "config.json"  # inside the backbone folder
_DATASET_NORM = (
    "(x - mean) / std per channel after clipping S1 to s1_clip (dB); stats from the dataset manifest"
)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with ``src``'s bytes: a hard link (no second copy on disk) or, across devices, a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def timm_config(encoder: Encoder, cfg: TrainConfig, inputs: dict) -> dict:
    """timm's ``config.json`` of the backbone (``local-dir:`` and Hugging Face Hub folders).

    ``pretrained_cfg.mean``/``std`` are what the backbone's first layer expects per channel: view 0's
    values for a native backbone, with zeros/ones for zero-padded channels; behind the 1x1 adapter the
    backbone takes the adapter's output (``adapters.safetensors``), so they are 0/1 and the card's inputs
    say what the adapter takes.
    """
    view0 = inputs["view0"]
    pc = dict(encoder.backbone.pretrained_cfg)
    c = encoder.in_chans
    if cfg.backbone.adapter == "conv1x1":
        mean, std = [0.0] * c, [1.0] * c
    else:
        pad = c - len(view0["channels"])
        mean, std = list(view0["mean"]) + [0.0] * pad, list(view0["std"]) + [1.0] * pad
    dynamic = bool(encoder.timm_kwargs.get("dynamic_img_size"))
    size = list(pc.get("input_size", (3, 224, 224)))[1:]  # the architecture's (a ViT's position table)
    return {
        "architecture": cfg.backbone.name,
        "num_classes": 0,
        "num_features": encoder.feature_dim,
        "in_chans": c,
        "model_args": {"in_chans": c, **encoder.timm_kwargs},
        "pretrained_cfg": {
            "input_size": [c, *size],
            "fixed_input_size": bool(pc.get("fixed_input_size", False)) and not dynamic,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": 0,
            "first_conv": pc.get("first_conv"),
            "classifier": pc.get("classifier"),
        },
        "eossl": {
            "channels": list(view0["channels"]) if cfg.backbone.adapter != "conv1x1" else None,
            "s1_clip": view0.get("s1_clip"),
            "trained_size": cfg.loader.size,
            "adapter": cfg.backbone.adapter,
            "input": "float tensors of the stored values (S2: reflectance x 10,000; S1: dB clipped to "
            "s1_clip), normalised (x - mean) / std per channel; not scaled to 0..1",
            "model_card": "model_card.json",
        },
    }


def export_backbone(
    encoder: Encoder,
    loader,
    cfg: TrainConfig,
    step: int,
    run_dir: Path,
    norm: InputNorm | None = None,
    starting: dict | None = None,
    mlflow_run_id: str | None = None,
) -> Path:
    """Write ``RUN_DIR/backbone/`` (see the module docstring).

    Args:
        encoder: the trained encoder (backbone + adapters).
        loader: its ``views`` (a ``ViewSet``) and the dataset ``manifest``.
        cfg, step: the run's config and the step exported.
        norm: the encoder's input normalisation (``train.weights.InputNorm``); None: the dataset's.
        starting: what the run started from (``train.weights.apply_starting_weights``' report), or None.
        mlflow_run_id: the pre-training run's, recorded in the card so that an evaluation of this export
            (a copy, or a checkpoint exported by evaluation, far from the run's checkpoints) still names
            and links the run it scores.
    """
    out = Path(run_dir) / "backbone"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    save_file(state, str(out / "backbone.safetensors"))
    _link_or_copy(out / "backbone.safetensors", out / "model.safetensors")
    if len(encoder.adapters):
        adapters = {k: v.detach().cpu().contiguous() for k, v in encoder.adapters.state_dict().items()}
        save_file(adapters, str(out / "adapters.safetensors"))
    views = loader.views
    specs = [views.view_spec(v) for v in range(len(views.views))]
    if norm is None:
        stats = [spec.normalisation(loader.manifest) for spec in specs]
        norm = input_norm([spec.channel_names for spec in specs], stats, "dataset", None)
    inputs = {}
    for v, spec in enumerate(specs):
        inputs[f"view{v}"] = {
            **spec.to_json(),
            "mean": [round(float(x), 6) for x in norm.mean[v]],
            "std": [round(float(x), 6) for x in norm.std[v]],
            "normalisation_source": norm.source[v],
        }
    text = _DATASET_NORM
    if not norm.identity:
        text = (
            "(x - mean) / std per channel after clipping S1 to s1_clip (dB); mean and std are the starting "
            "weights' for the channels whose normalisation_source is 'weights', the dataset manifest's for "
            "the others"
        )
    card = {
        "method": cfg.method,
        "timm_model": cfg.backbone.name,
        "in_chans": encoder.in_chans,
        "timm_kwargs": {"in_chans": encoder.in_chans, "num_classes": 0, **encoder.timm_kwargs},
        "load": f"timm.create_model({cfg.backbone.name!r}, in_chans={encoder.in_chans}, num_classes=0"
        + "".join(f", {k}={v!r}" for k, v in encoder.timm_kwargs.items())
        + ")",
        "adapter": {
            "type": cfg.backbone.adapter,
            "mode": cfg.backbone.adapter_mode,
            "channels": encoder.channels,
            "out_channels": cfg.backbone.adapter_channels,
        },
        "view_mode": cfg.loader.mode,
        "inputs": inputs,
        "normalisation": text,
        "input_normalisation": norm.choice,
        "starting_weights": starting,
        "timm_local_dir": "timm.create_model('local-dir:<this folder>', pretrained=True)",
        "dataset": cfg.data,
        "dataset_manifest_sha256": loader.manifest.get("manifest_sha256"),
        "steps": step,
        "feature_dim": encoder.feature_dim,
        "mlflow_run_id": mlflow_run_id,
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    (out / TIMM_CONFIG).write_text(json.dumps(timm_config(encoder, cfg, inputs), indent=1))
    lines = [
        f"# {cfg.method} backbone: {cfg.backbone.name}",
        "",
        f"Load: `{card['load']}` then "
        "`model.load_state_dict(safetensors.torch.load_file('backbone.safetensors'))`.",
        "Or, with timm alone: `timm.create_model('local-dir:PATH/TO/THIS/FOLDER', pretrained=True)`; "
        "`timm.data.resolve_data_config(model=model)` gives the mean/std below (view0) in stored units "
        "(S2 reflectance x 10,000, S1 dB): feed `(x - mean) / std` of float values, not scaled to 0..1.",
        f"Adapter: {cfg.backbone.adapter} ({cfg.backbone.adapter_mode}); input channels {encoder.channels}.",
        f"Trained {step} steps on `{cfg.data}` (manifest {card['dataset_manifest_sha256']}).",
        "",
        "| view | channels (in order) | mean | std |",
        "| --- | --- | --- | --- |",
    ]
    for name, spec in inputs.items():
        lines.append(f"| {name} | {', '.join(spec['channels'])} | {spec['mean']} | {spec['std']} |")
    lines += [
        "",
        f"S1 is clipped to {inputs['view0']['s1_clip']} dB before normalisation: {card['normalisation']}.",
        f"Input normalisation: {norm.choice}.",
    ]
    if starting is not None:
        lines.append(
            f"Started from {starting['source']} (sha256 {starting['sha256'][:16]}..., input "
            f"{starting['input']}; first layer: {starting['first_layer']})."
        )
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out


def read_model_card(run_dir: str | Path) -> dict:
    """The model card a finished run exported: read beside its writer, so no reader restates its path.

    Raises:
        FileNotFoundError: the run has no card (not finished, or not an eossl pre-training run).
    """
    path = Path(run_dir) / MODEL_CARD
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a finished eossl pre-training run")
    return json.loads(path.read_text())
