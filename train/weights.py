"""Starting weights for a backbone: where they come from, their key layout and their first layer.

A run may start from timm's pretrained weights by name (``timm:resnet50.a1_in1k``), from a weights file
(a timm/torchvision state dict as ``.safetensors`` or a torch file, including torchgeo's SSL4EO-S12 ResNet
and ViT weights and the SSL4EO-S12 authors' MoCo/DINO checkpoints), or from another eossl run (its
folder, its ``backbone/`` folder or the ``backbone.safetensors`` in it). Nothing is downloaded: clusters
often have no network, so a timm name whose file is not in the local cache fails with the file to put
where.

Three things are decided here, each recorded in the model card and in MLflow:

- **The key layout.** Weights are looked up under the usual wrappers (``state_dict``, ``model``,
  ``teacher``, ...) and prefixes (``module.``, MoCo's ``encoder_q.``, MoCo v3's ``base_encoder.``,
  DINO's ``backbone.``); classifier and projection heads (``fc.*``, ``head.*``) the pooled-feature
  backbone lacks are dropped. Any other difference from the timm model's keys is an error naming the
  file and the missing and unexpected keys.
- **The first layer.** When the weights' channels are named (an eossl export, or ``weights_input``
  naming the input the file was trained on) the input's channels are matched by name: bands the input
  lacks are dropped from the first layer, channels the weights never saw start with zero weights. With
  unnamed channels the first layer is adapted by count with timm's ``adapt_input_conv`` (RGB weights are
  repeated over C channels and scaled by 3/C). A 3-channel network behind the 1x1 adapter
  (``backbone.adapter=conv1x1``) takes RGB weights unchanged.
- **The normalisation** the weights expect (``WeightsInput.mean``/``std``, or an eossl model card's) is
  handed to ``train/input_norm.py``, which applies it between the loader and the encoder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eossl.streaming.inputs import InputSpec

from .config import WEIGHTS_INPUT_NAMES

__all__ = [
    "WEIGHTS_INPUTS",
    "StartingWeights",
    "WeightsInput",
    "apply_starting_weights",
    "first_layer_channels",
    "load_state",
    "read_starting_weights",
    "timm_weights_file",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


@dataclass(frozen=True)
class WeightsInput:
    """The input a weights file was trained on: the first layer's channels and their normalisation.

    Attributes:
        name: the value of ``backbone.weights_input`` (or the ``@NAME`` suffix of an evaluated file).
        channels: eossl channel names of the first layer's inputs, in order; None when unknown.
        mean, std: per channel, in the dataset's stored units (S2: reflectance x 10,000, S1: dB);
            None: the weights declare no normalisation of these bands (the dataset's is used).
        about: one line for the model card and the docs.
    """

    name: str
    channels: tuple[str, ...] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    about: str


_S2_ALL = tuple(InputSpec.parse("s2", "all").channel_names)
_S1 = tuple(InputSpec.parse("s1").channel_names)
WEIGHTS_INPUTS: dict[str, WeightsInput] = {
    w.name: w
    for w in (
        WeightsInput(
            "ssl4eo_s2",
            _S2_ALL,
            (0.0,) * len(_S2_ALL),
            (10000.0,) * len(_S2_ALL),
            "SSL4EO-S12 Sentinel-2 L1C weights (torchgeo's *_SENTINEL2_ALL_*): 13 bands B1-B12 with B8A and "
            "B10, reflectance x 10,000 divided by 10,000",
        ),
        WeightsInput(
            "ssl4eo_s1",
            _S1,
            (-12.59, -20.26),
            (5.26, 5.91),
            "SSL4EO-S12 Sentinel-1 GRD weights (torchgeo's *_SENTINEL1_ALL_*): VV, VH in dB, standardised "
            "with SSL4EO-S12's mean (-12.59, -20.26) and std (5.26, 5.91)",
        ),
        WeightsInput(
            "rgb",
            ("s2:B4", "s2:B3", "s2:B2"),
            None,
            None,
            "an RGB network (ImageNet weights): its channels are S2 B4, B3, B2; ImageNet's normalisation of "
            "0..1 photographs has no meaning for reflectance, so the dataset's is used",
        ),
        WeightsInput(
            "unknown",
            None,
            None,
            None,
            "channels unknown: the first layer is adapted by count, the dataset's normalisation is used",
        ),
    )
}
if tuple(WEIGHTS_INPUTS) != WEIGHTS_INPUT_NAMES:  # the config checks names without importing this module
    raise ImportError(f"train.config.WEIGHTS_INPUT_NAMES {WEIGHTS_INPUT_NAMES} != {tuple(WEIGHTS_INPUTS)}")


@dataclass
class StartingWeights:
    """Weights read for a backbone, in timm's key layout.

    Attributes:
        source: the value as given (``timm:NAME``, a file, an eossl run or backbone folder).
        kind: 'timm', 'file' or 'eossl'.
        path: the file the tensors came from.
        sha256: of that file (what exactly the run started from).
        state: the backbone's tensors (keys as in ``timm.create_model(...).state_dict()``), the first
            layer as stored.
        timm_model: the architecture the source names (None for a plain file).
        channels: eossl names of the first layer's input channels, in order; None when unknown.
        stats: channel name -> (mean, std) the weights expect; empty when they declare none.
        input_name: what describes the input (a ``WEIGHTS_INPUTS`` name, 'model card' or 'timm').
        adapters: an eossl export's 1x1 adapter tensors (None otherwise).
        adapter: an eossl export's adapter settings (None otherwise).
        layout: how the keys were read (wrappers unwrapped, prefixes stripped, heads dropped).
    """

    source: str
    kind: str
    path: str
    sha256: str
    state: dict[str, torch.Tensor]
    timm_model: str | None
    channels: list[str] | None
    stats: dict[str, tuple[float, float]]
    input_name: str
    adapters: dict[str, torch.Tensor] | None = None
    adapter: dict | None = None
    layout: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What the model card and MLflow record (no tensors)."""
        return {
            "source": self.source,
            "kind": self.kind,
            "file": self.path,
            "sha256": self.sha256,
            "timm_model": self.timm_model,
            "input": self.input_name,
            "input_about": WEIGHTS_INPUTS[self.input_name].about if self.input_name in WEIGHTS_INPUTS else "",
            "channels": self.channels,
            "declares_normalisation": bool(self.stats),
            "key_layout": self.layout,
        }


# --- reading --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state(path: str | Path) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` or torch file (torch files are read with ``weights_only``).

    Raises:
        ValueError: the file is missing, unreadable, or a torch file holding Python objects besides tensors
            (never unpickled here: extract its state dict where you trust it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"weights file {path}: not a readable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors name no file; unsafe globals are refused, never run
        raise ValueError(
            f"weights file {path}: not readable as a torch state dict with weights_only=True ({exc}). "
            "A checkpoint holding Python objects besides tensors is not unpickled here: where you trust it, "
            "save its state dict alone (torch.save(ckpt['state_dict'], 'weights.pth'))"
        ) from exc


_WRAPPERS = ("state_dict", "model", "teacher", "student", "module", "net", "encoder")
# A sub-network's prefix selects it (MoCo's query encoder, MoCo v3's base encoder, DINO's backbone).
_SELECT_PREFIXES = ("encoder_q.", "base_encoder.", "backbone.", "encoder.", "model.")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_HEADS = ("fc.", "head.", "head_dist.", "classifier.")


def _unwrap(obj: Any, layout: list[str]) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside the usual checkpoint wrappers."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((w for w in _WRAPPERS if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        layout.append(f"tensors under '{inner}'")
        obj = obj[inner]
    return {}


def _strip(state: dict[str, torch.Tensor], layout: list[str]) -> dict[str, torch.Tensor]:
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            layout.append(f"prefix '{prefix}' stripped")
    for prefix in _SELECT_PREFIXES:
        chosen = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if chosen:
            if len(chosen) < len(state):
                layout.append(f"'{prefix}*' kept ({len(state) - len(chosen)} other tensors left out)")
            else:
                layout.append(f"prefix '{prefix}' stripped")
            return chosen
    return state


def timm_weights_file(name: str) -> tuple[Path, dict]:
    """The local file of timm's pretrained weights ``name`` (HF cache, torch hub cache or the cfg's file).

    Raises:
        ValueError: no such pretrained tag, or its file is not on this machine (with where to put it).
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # timm raises several kinds for unknown names
        cfg = None
    if cfg is None:
        raise ValueError(f"backbone.weights timm:{name}: timm has no pretrained weights of that name")
    places = []
    if cfg.file:
        if Path(cfg.file).is_file():
            return Path(cfg.file), {"file": cfg.file}
        places.append(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found), {"custom_load": False}
        places.append(
            f"the Hugging Face cache ({HF_HUB_CACHE}: `huggingface-cli download {repo} {names[0]}` on a "
            "machine with network, then copy that cache folder here or set HF_HUB_CACHE to it)"
        )
    if cfg.url:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if hub.is_file():
            return hub, {}
        places.append(f"{hub} (downloaded from {cfg.url})")
    raise ValueError(
        f"backbone.weights timm:{name}: the weights are not on this machine and eossl does not download. "
        f"Put the file in {' or '.join(places) or 'a local file'}, or give the file's path as "
        "backbone.weights"
    )


def _read_timm(name: str) -> StartingWeights:
    import timm

    path, overlay = timm_weights_file(name)
    # timm itself reads its own files (filters, classifier removal); the model keeps the native channels.
    model = timm.create_model(
        name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path), **overlay}
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    in_chans = model.pretrained_cfg.get("input_size", (3,))[0]
    named = WEIGHTS_INPUTS["rgb"] if in_chans == 3 else WEIGHTS_INPUTS["unknown"]
    return StartingWeights(
        source=f"timm:{name}",
        kind="timm",
        path=str(path),
        sha256=_sha256(path),
        state=state,
        timm_model=name.split(".", 1)[0],
        channels=list(named.channels) if named.channels else None,
        stats={},
        input_name="rgb" if in_chans == 3 else "unknown",
        layout=["timm's own loader"],
    )


def _eossl_folder(path: Path) -> Path | None:
    """The ``backbone/`` folder of an eossl export named by a run folder, the folder itself or its file."""
    exported = path.name in ("backbone.safetensors", "model.safetensors")
    for folder in (path / "backbone", path) + ((path.parent,) if exported else ()):
        if (folder / "model_card.json").is_file() and (folder / "backbone.safetensors").is_file():
            return folder
    return None


def _read_eossl(folder: Path, source: str) -> StartingWeights:
    from safetensors.torch import load_file

    card = json.loads((folder / "model_card.json").read_text())
    view0 = card["inputs"]["view0"]
    stats = {}
    for view in card["inputs"].values():
        for name, m, s in zip(view["channels"], view["mean"], view["std"], strict=True):
            stats[name] = (float(m), float(s))
    adapter = card["adapter"]
    if adapter["type"] == "native":
        channels = list(view0["channels"])
    elif adapter["type"] == "zeropad":
        channels = list(view0["channels"]) + ["pad"] * (card["in_chans"] - len(view0["channels"]))
    else:
        channels = None  # the backbone's input is the adapter's output
    adapters = folder / "adapters.safetensors"
    path = folder / "backbone.safetensors"
    return StartingWeights(
        source=source,
        kind="eossl",
        path=str(path),
        sha256=_sha256(path),
        state=dict(load_file(str(path))),
        timm_model=card["timm_model"],
        channels=channels,
        stats=stats,
        input_name="model card",
        adapters=dict(load_file(str(adapters))) if adapters.is_file() else None,
        adapter=adapter,
        layout=["eossl export"],
    )


def read_starting_weights(source: str, weights_input: str | None = None) -> StartingWeights:
    """Read the weights ``source`` names (see the module docstring) without building a model.

    Args:
        source: ``timm:NAME``, a weights file, or an eossl run/backbone folder (or its backbone.safetensors).
        weights_input: for a plain file, the input it was trained on (a ``WEIGHTS_INPUTS`` name).

    Raises:
        ValueError: nothing there, a download would be needed, an unknown ``weights_input``, a plain file
            without one, or a file that holds no tensors.
    """
    if weights_input is not None and weights_input not in WEIGHTS_INPUTS:
        raise ValueError(
            f"backbone.weights_input must be one of {', '.join(WEIGHTS_INPUTS)}, got {weights_input!r}"
        )
    if source.startswith("timm:"):
        return _read_timm(source.removeprefix("timm:"))
    path = Path(source)
    if not path.exists():
        raise ValueError(
            f"backbone.weights {source}: no such file or folder (give timm:NAME, a weights file "
            f"({', '.join(WEIGHT_SUFFIXES)}) or an eossl run folder)"
        )
    folder = _eossl_folder(path)
    if folder is not None:
        return _read_eossl(folder, source)
    if path.is_dir():
        raise ValueError(
            f"backbone.weights {source}: a folder without backbone/model_card.json and "
            "backbone.safetensors (not a finished eossl run or an exported backbone)"
        )
    layout: list[str] = []
    state = _strip(_unwrap(load_state(path), layout), layout)
    if not state:
        raise ValueError(f"weights file {path}: holds no tensors (nor a state_dict/model/teacher entry)")
    if weights_input is None:
        first = next((v for v in state.values() if v.ndim == 4), None)
        hint = {13: "ssl4eo_s2", 2: "ssl4eo_s1", 3: "rgb"}.get(
            int(first.shape[1]) if first is not None else 0
        )
        raise ValueError(
            f"weights file {path} does not say which bands its first layer takes or how they were "
            f"normalised: set backbone.weights_input to one of "
            + "; ".join(f"{w.name} ({w.about})" for w in WEIGHTS_INPUTS.values())
            + (f". Its first layer takes {first.shape[1]} channels: {hint}?" if hint else "")
        )
    named = WEIGHTS_INPUTS[weights_input]
    stats = {}
    if named.channels and named.mean is not None and named.std is not None:
        stats = {c: (m, s) for c, m, s in zip(named.channels, named.mean, named.std, strict=True)}
    return StartingWeights(
        source=source,
        kind="file",
        path=str(path),
        sha256=_sha256(path),
        state=state,
        timm_model=None,
        channels=list(named.channels) if named.channels else None,
        stats=stats,
        input_name=weights_input,
        layout=layout or ["keys as stored"],
    )


# --- loading into a timm backbone ---------------------------------------------------------------------


def _first_conv(backbone: nn.Module) -> str | None:
    name = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return f"{name}.weight" if name else None


def _adapt_first_layer(
    weight: torch.Tensor, have: list[str] | None, want: list[str] | None, in_chans: int, where: str
) -> tuple[torch.Tensor, str]:
    """The first layer's weight for ``want`` (names, or None) from one trained on ``have``."""
    from timm.models import adapt_input_conv

    if have is not None and want is not None and list(have) == list(want):
        return weight, "as stored"
    if have is not None and want is not None:
        shared = [c for c in want if c in have]
        if not shared:
            raise ValueError(
                f"{where}: the weights' first layer takes {have}, the input has {want}: no channel in "
                "common (set backbone.weights_input=unknown to adapt the layer by channel count)"
            )
        out = weight.new_zeros(weight.shape[0], len(want), *weight.shape[2:])
        for j, c in enumerate(want):
            if c in have:
                out[:, j] = weight[:, have.index(c)]
        dropped = [c for c in have if c not in want]
        new = [c for c in want if c not in have]
        return out, (
            "channels matched by name"
            + (f"; dropped (not in the input): {dropped}" if dropped else "")
            + (f"; zero-initialised (not in the weights): {new}" if new else "")
        )
    if weight.shape[1] == in_chans:
        return weight, "as stored (channels matched by count)"
    try:
        adapted = adapt_input_conv(in_chans, weight, base_chans=int(weight.shape[1]))
    except NotImplementedError as exc:
        raise ValueError(
            f"{where}: the first layer takes {weight.shape[1]} channels, the backbone {in_chans}, and timm's "
            f"adapt_input_conv cannot convert them ({exc}); name the weights' input (backbone.weights_input) "
            "or put the 1x1 adapter in front (backbone.adapter=conv1x1, adapter_channels="
            f"{weight.shape[1]})"
        ) from exc
    return adapted, f"timm adapt_input_conv: {weight.shape[1]} -> {in_chans} channels"


def load_into_backbone(
    backbone: nn.Module, weights: StartingWeights, channels: list[str] | None, in_chans: int
) -> dict[str, Any]:
    """Load ``weights`` into a timm backbone built for ``in_chans`` input channels named ``channels``.

    Returns:
        What was done: keys dropped, the first layer's adaptation.

    Raises:
        ValueError: keys missing or unexpected (named, with the file), or a tensor of another shape.
    """
    target = backbone.state_dict()
    state = dict(weights.state)
    dropped = sorted(k for k in state if k not in target and k.startswith(_HEADS))
    for k in dropped:
        del state[k]
    missing = sorted(k for k in target if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in target)
    if missing or unexpected:
        raise ValueError(
            f"weights {weights.path} do not fit {type(backbone).__name__} "
            f"({', '.join(weights.layout)}): missing {len(missing)} {missing[:6]}, unexpected "
            f"{len(unexpected)} {unexpected[:6]}. Read layouts: a timm/torchvision state dict, optionally "
            f"under {'/'.join(_WRAPPERS)} and prefixed {'/'.join(_STRIP_PREFIXES + _SELECT_PREFIXES)}; is "
            "backbone.name the architecture the weights were trained with?"
        )
    first = _first_conv(backbone)
    first_layer = "as stored"
    if first and first in state:
        state[first], first_layer = _adapt_first_layer(
            state[first], weights.channels, channels, in_chans, f"weights {weights.path}"
        )
    for k, v in state.items():
        if k in target and tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(
                f"weights {weights.path}: {k} has shape {tuple(v.shape)}, the backbone's is "
                f"{tuple(target[k].shape)} (another architecture or image size?)"
            )
    backbone.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=False)
    return {"dropped_keys": dropped, "first_layer": first_layer}


def first_layer_channels(adapter: str, in_chans: int, view_channels: list[list[str]]) -> list[str] | None:
    """Names of the backbone's input channels (None when they are the 1x1 adapter's outputs, or views
    differ)."""
    if adapter == "conv1x1" or any(v != view_channels[0] for v in view_channels):
        return None
    names = list(view_channels[0])
    return names + ["pad"] * (in_chans - len(names)) if adapter == "zeropad" else names


def apply_starting_weights(
    method: nn.Module, weights: StartingWeights, view_channels: list[list[str]]
) -> dict:
    """Load ``weights`` into every encoder of a method (MoCo's query and key encoders, DINO's student and
    teacher), so each starts from the same tensors.

    Returns:
        The report recorded in the model card and MLflow (source, first layer, adapters).
    """
    from .backbones import Encoder

    encoders = [m for m in method.modules() if isinstance(m, Encoder)]
    if not encoders:
        raise ValueError(f"{type(method).__name__} has no eossl Encoder to load weights into")
    report: dict[str, Any] = {}
    for enc in encoders:
        if weights.timm_model and weights.timm_model != enc.cfg.name:
            raise ValueError(
                f"backbone.weights {weights.source} are a {weights.timm_model}, backbone.name is "
                f"{enc.cfg.name!r}: set backbone.name={weights.timm_model}"
            )
        names = first_layer_channels(enc.cfg.adapter, enc.in_chans, view_channels)
        report = load_into_backbone(enc.backbone, weights, names, enc.in_chans)
        report["adapters"] = "fresh"
        if weights.adapters is not None and len(enc.adapters):
            own = enc.adapters.state_dict()
            if set(own) == set(weights.adapters) and all(
                own[k].shape == weights.adapters[k].shape for k in own
            ):
                enc.adapters.load_state_dict(weights.adapters)
                report["adapters"] = "loaded"
    return {**weights.describe(), **report}
