"""A scaling study: a grid of pre-training runs, each followed by a downstream evaluation.

A study file (YAML) names the dataset, the method, training values shared by every cell, the grid (any
training config field: ``batch_size``, ``epochs``, ``optim.lr``, ``mode``, ...), the learning-rate rule
and the evaluation. ``--set`` overrides any of it by dotted key (``--set grid.epochs=[1,2]``,
``--set train.size=64``, ``--set eval.budget=1024``); values are parsed as YAML. ``train:`` and ``grid:``
take any training config key (checked by ``eossl train`` with its own resolver); every other key is a
field of the dataclasses below, and an unknown one is refused with the closest valid keys.

Cells are the Cartesian product of the grid in the order the file lists it. A cell's name is made of its
values (``batch_size-32_epochs-100``), so a re-run finds the same folders and MLflow runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eossl.ingest.storage import url_scheme

from ..methods import method_names

__all__ = [
    "Cell",
    "EvalPlan",
    "LrRule",
    "PlotSpec",
    "StudyConfig",
    "StudyLaunch",
    "find_study",
    "load_study",
    "packaged_studies",
]

# The study files shipped inside the package (launch/studies/*.yaml): an installed eossl has no checkout.
_PACKAGED = Path(__file__).resolve().parent.parent / "studies"


@dataclass(frozen=True)
class LrRule:
    """Learning rate as a function of the effective batch size (logged per cell as ``lr_scaled``).

    Attributes:
        rule: 'none', 'linear' (lr x B / base_batch, Goyal et al.) or 'sqrt' (lr x sqrt(B / base_batch)).
        base_lr: learning rate at ``base_batch`` (None: the method's default).
        base_batch: the batch size at which ``base_lr`` applies.
        warmup_epochs: linear warm-up (large batches need it with the linear rule); None: the method's.
    """

    rule: str = "linear"
    base_lr: float | None = None
    base_batch: int = 256
    warmup_epochs: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("none", "linear", "sqrt"):
            raise ValueError(f"lr.rule must be none, linear or sqrt, got {self.rule!r}")

    def overrides(self) -> dict[str, Any]:
        values: dict[str, Any] = {"optim.lr_scaling": self.rule, "optim.base_batch": self.base_batch}
        if self.base_lr is not None:
            values["optim.lr"] = self.base_lr
        if self.warmup_epochs is not None:
            values["optim.warmup_epochs"] = self.warmup_epochs
        return values


@dataclass(frozen=True)
class EvalPlan:
    """The downstream evaluation after each cell's pre-training (``eossl eval classify|segment`` settings).

    Attributes:
        task: 'classify' (SEN12MS scene classification) or 'segment' (land-cover maps, mIoU).
        protocols: classify: any of linear, finetune, knn; segment: linear, finetune; one evaluation each.
        budget: labels (a budget subset written by ingest, e.g. 1024, or 'all').
        inputs: input columns (s1, s2, s1s2); those the backbone cannot take are reported as n/a.
        seeds, label, multilabel, s2_bands: as ``eossl eval classify``.
        finetune_epochs, batch_size: fine-tuning (classify) or head-training (segment) epochs, batch size.
        inits: rows per cell ('checkpoint'; add 'random' for a from-scratch row in every cell).
    """

    task: str = "classify"
    protocols: tuple[str, ...] = ("linear",)
    budget: str = "1024"
    inputs: tuple[str, ...] = ("s2",)
    seeds: tuple[int, ...] = (0,)
    label: str = "igbp_simple"
    multilabel: bool = False
    s2_bands: str = "land"
    finetune_epochs: int = 10
    batch_size: int = 32
    inits: tuple[str, ...] = ("checkpoint",)


@dataclass(frozen=True)
class PlotSpec:
    """Which grid field is the x axis of the score plot and which one draws one line per value."""

    x: str = "epochs"
    lines: str = "batch_size"


@dataclass(frozen=True)
class StudyLaunch:
    """How each cell's pre-training starts on this machine.

    Attributes:
        accelerate_config: None: one process (``python -m eossl.train``); else ``accelerate launch`` with
            this config file (e.g. launch/accelerate/gpu_8.yaml).
        num_processes: override the config's process count.
    """

    accelerate_config: str | None = None
    num_processes: int | None = None


@dataclass(frozen=True)
class Cell:
    """One grid point: its name and the training values that differ from the study's shared ones."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class StudyConfig:
    """A study (see the module docstring); ``out`` holds every cell's run and evaluation."""

    name: str
    data: str
    out: str
    method: str = "moco"
    train: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    lr: LrRule = field(default_factory=LrRule)
    eval: EvalPlan = field(default_factory=EvalPlan)
    plot: PlotSpec = field(default_factory=PlotSpec)
    launch: StudyLaunch = field(default_factory=StudyLaunch)
    experiment: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", self.name):
            raise ValueError(f"study name {self.name!r}: letters, digits, '.', '_' and '-' only")
        methods = method_names()
        if self.method not in methods:
            raise ValueError(f"method must be {' or '.join(methods)}, got {self.method!r}")
        if not self.grid:
            raise ValueError("the study has no grid (e.g. grid: {batch_size: [32, 64], epochs: [10, 20]})")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid.{key} must be a non-empty list, got {values!r}")
            if len(set(map(str, values))) != len(values):
                raise ValueError(f"grid.{key} lists a value twice: {values}")
        bad = {"data", "out"} & (set(self.grid) | set(self.train))
        if bad:
            raise ValueError(f"{sorted(bad)} are set by the study itself, not by train:/grid:")
        if "method" in self.train:
            raise ValueError("set the method with method: (or as a grid axis), not in train:")
        for method in self.grid.get("method", []):
            if method not in methods:
                raise ValueError(f"grid.method: unknown method {method!r} ({', '.join(methods)})")
        known = {"classify": ("linear", "finetune", "knn"), "segment": ("linear", "finetune")}
        if self.eval.task not in known:
            raise ValueError(f"eval.task must be classify or segment, got {self.eval.task!r}")
        for protocol in self.eval.protocols:
            if protocol not in known[self.eval.task]:
                raise ValueError(
                    f"eval.protocols: {protocol!r} is not a {self.eval.task} protocol "
                    f"({', '.join(known[self.eval.task])})"
                )

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"eossl-study-{self.name}"

    def cells(self) -> list[Cell]:
        keys = list(self.grid)
        cells = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            name = "_".join(f"{k.rsplit('.', 1)[-1]}-{_slug(v)}" for k, v in values.items())
            cells.append(Cell(name, values))
        return cells

    def cell(self, name: str) -> Cell:
        for cell in self.cells():
            if cell.name == name:
                return cell
        raise ValueError(f"no cell {name!r} in study {self.name}; cells: {[c.name for c in self.cells()]}")

    def cell_method(self, cell: Cell) -> str:
        return str(cell.values.get("method", self.method))

    def train_values(self, cell: Cell) -> dict[str, Any]:
        """Every ``--set`` value of the cell's training run, in a fixed order: shared, lr rule, grid."""
        grid = {k: v for k, v in cell.values.items() if k != "method"}
        return {**self.train, **self.lr.overrides(), "experiment": self.experiment_name, **grid}

    def train_config(self, cell: Cell):
        """The cell's full training config, resolved as ``eossl train`` resolves the cell's command (its
        ``--set`` values as text), without starting anything.

        Raises:
            ValueError: naming the cell, for an unknown or ambiguous key or a bad value.
        """
        from eossl.train.config import load_config

        values = {k: str(v) for k, v in self.train_values(cell).items()}
        try:
            return load_config(self.cell_method(cell), None, {**values, "data": self.data, "out": self.out})
        except ValueError as exc:
            raise ValueError(f"study cell {cell.name}: {exc}") from exc

    def resolved_values(self, cell: Cell) -> dict[str, Any]:
        """Full dotted key -> resolved value of every training key the study sets for ``cell``."""
        from eossl.train.config import flatten
        from eossl.train.overrides import resolve_key

        cfg = self.train_config(cell)
        flat = flatten(cfg)
        shown: dict[str, Any] = {}
        for key in self.train_values(cell):
            others = tuple(m for m in method_names() if m != cfg.method)
            _, _, full = resolve_key(cfg, key, skip_sections=others)
            shown[full] = flat.get(full)
        return shown

    def to_yaml(self) -> str:
        """The study with its overrides applied: what cluster jobs re-read with ``--config``."""
        return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(self), default=str)), sort_keys=False)

    def digest(self) -> str:
        """What the cells' results depend on (not how a study is launched or plotted: that may change)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("launch", "plot")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", str(value)) or "x"


def _absolute(path: str) -> str:
    return path if url_scheme(path) is not None else str(Path(path).resolve())


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def _tuple(values: Any) -> tuple:
    if isinstance(values, str):
        return tuple(v.strip() for v in values.split(",") if v.strip())
    if isinstance(values, (list, tuple)):
        return tuple(values)
    return (values,)


# the study's dataclass sections; train: and grid: are open mappings of training config keys
_SECTIONS = {"lr": LrRule, "eval": EvalPlan, "plot": PlotSpec, "launch": StudyLaunch}


def _study_keys() -> list[str]:
    """Every dotted key a study file or ``--set`` may name outside ``train:`` and ``grid:``."""
    keys = []
    for f in dataclasses.fields(StudyConfig):
        if f.name in _SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(_SECTIONS[f.name])]
        elif f.name not in ("train", "grid"):
            keys.append(f.name)
    return keys


def _unknown_keys(where: str, unknown: set[str], known: Iterable[str], prefix: str = "") -> ValueError:
    """The error for misspelt keys: what is known there, and the closest valid dotted keys anywhere."""
    keys = _study_keys()
    by_name = {k.rsplit(".", 1)[-1]: k for k in keys}
    near: list[str] = []
    for key in sorted(unknown):
        near += difflib.get_close_matches(prefix + key, keys, n=3, cutoff=0.6)
        near += [by_name[n] for n in difflib.get_close_matches(key, by_name, n=3, cutoff=0.6)]
    near = list(dict.fromkeys(near))[:3]
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    if not prefix:
        hint += " (training config keys go under train: or grid:)"
    return ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}{hint}")


def _section(cls, tree: dict | None, where: str):
    tree = dict(tree or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(tree) - set(names)
    if unknown:
        raise _unknown_keys(where, unknown, names, prefix=f"{where}.")
    for key, value in tree.items():
        if names[key].type.startswith("tuple"):
            tree[key] = _tuple(value)
        elif key == "budget":
            tree[key] = str(value)
    return cls(**tree)


def packaged_studies() -> list[str]:
    """Names of the study files that ship with eossl (``eossl study --config NAME``)."""
    return sorted(p.stem for p in _PACKAGED.glob("*.yaml"))


def find_study(path: str | Path) -> Path:
    """The study file at ``path``, or else the packaged study of that name (``demo_batch_epochs``).

    A file that exists wins, so a user's own ``demo_batch_epochs.yaml`` is never shadowed; a bare name
    (no folder, optional ``.yaml``) is looked up among the packaged studies so an installed eossl finds
    them from any working directory.
    """
    given = Path(path)
    if given.is_file():
        return given
    if given.parent == Path(".") and given.suffix in ("", ".yaml"):
        packaged = _PACKAGED / f"{given.stem}.yaml"
        if packaged.is_file():
            return packaged
    raise ValueError(
        f"{path}: no such study file, and no packaged study of that name "
        f"(packaged: {', '.join(packaged_studies()) or 'none'})"
    )


def load_study(path: str | Path | None, overrides: dict[str, str] | None = None) -> StudyConfig:
    """Read a study file (a path or a packaged study's name) and apply ``--set key=value`` overrides.

    Values are parsed as YAML.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = find_study(path)
        text = path.read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ValueError(
                f"{path}: a study file is a mapping (name, data, out, train, grid, lr, eval, ...)"
            )
    tree = copy.deepcopy(tree)
    for key, raw in (overrides or {}).items():
        _set_dotted(tree, key, yaml.safe_load(raw) if isinstance(raw, str) else raw)
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = set(tree) - known
    if unknown:
        raise _unknown_keys(str(path or "study"), unknown, known)
    missing = [k for k in ("name", "data", "out") if not tree.get(k)]
    if missing:
        raise ValueError(f"{path or 'study'}: {', '.join(missing)} must be set (in the file or with --set)")
    optional = {key: tree[key] for key in ("method", "experiment") if key in tree}  # else the field defaults
    grid = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in (tree.get("grid") or {}).items()}
    # Local paths become absolute: cluster jobs and re-runs from another folder find the same study.
    return StudyConfig(
        name=str(tree["name"]),
        data=_absolute(str(tree["data"])),
        out=_absolute(str(tree["out"])),
        **optional,
        train=dict(tree.get("train") or {}),
        grid=grid,
        lr=_section(LrRule, tree.get("lr"), "lr"),
        eval=_section(EvalPlan, tree.get("eval"), "eval"),
        plot=_section(PlotSpec, tree.get("plot"), "plot"),
        launch=_section(StudyLaunch, tree.get("launch"), "launch"),
    )
