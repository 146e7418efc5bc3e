"""Export of a trained backbone: weights any timm user can load, and a model card saying what goes in.

``RUN_DIR/backbone/``: ``backbone.safetensors`` (the timm model's state dict: loads into
``timm.create_model(name, in_chans=C, num_classes=0)``), ``adapters.safetensors`` when 1x1 adapters were
used, ``model_card.json`` (machine-readable) and ``README.md`` (bands, order, normalisation, how to load).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .backbones import Encoder
from .config import TrainConfig

__all__ = ["MODEL_CARD", "export_backbone", "read_model_card"]

MODEL_CARD = "backbone/model_card.json"  # inside a run folder


def export_backbone(
    encoder: Encoder, loader, cfg: TrainConfig, step: int, run_dir: Path, mlflow_run_id: str | None = None
) -> Path:
    """Write ``run_dir/backbone/``: weights, model card and README. ``mlflow_run_id`` is the pre-training
    run's, recorded in the card so that an evaluation of this export (a copy, or a checkpoint exported by
    evaluation, far from the run's checkpoints) still names and links the run it scores."""
    out = Path(run_dir) / "backbone"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    save_file(state, str(out / "backbone.safetensors"))
    if len(encoder.adapters):
        adapters = {k: v.detach().cpu().contiguous() for k, v in encoder.adapters.state_dict().items()}
        save_file(adapters, str(out / "adapters.safetensors"))
    views = loader.views
    inputs = {}
    for v in range(len(views.views)):
        spec = views.view_spec(v)
        mean, std = spec.normalisation(loader.manifest)
        inputs[f"view{v}"] = {**spec.to_json(), "mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
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
        "normalisation": (
            "(x - mean) / std per channel after clipping S1 to s1_clip (dB); stats from the dataset manifest"
        ),
        "dataset": cfg.data,
        "dataset_manifest_sha256": loader.manifest.get("manifest_sha256"),
        "steps": step,
        "feature_dim": encoder.feature_dim,
        "mlflow_run_id": mlflow_run_id,
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    lines = [
        f"# {cfg.method} backbone: {cfg.backbone.name}",
        "",
        f"Load: `{card['load']}` then "
        "`model.load_state_dict(safetensors.torch.load_file('backbone.safetensors'))`.",
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
    ]
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
