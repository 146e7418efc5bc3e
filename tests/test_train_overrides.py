"""The ``--config FILE --set key=value`` resolver every command uses (``eossl.train.overrides``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from eossl.train.overrides import apply_overrides, read_yaml_overrides


@dataclass
class _Section:
    name: str = "a"
    momentum: float = 0.9


@dataclass
class _Config:
    seeds: tuple[int, ...] = (0,)
    inputs: tuple[str, ...] = ("s1",)
    budget: str = "1024"
    lr: float = 0.1
    flag: bool = False
    cache: str | None = "x"
    optim: _Section = field(default_factory=_Section)
    moco: _Section = field(default_factory=_Section)


def test_values_take_the_declared_types_from_strings_and_yaml():
    cfg = apply_overrides(
        _Config(),
        {"seeds": "0,1", "inputs": '["s2", "s1s2"]', "budget": 64, "lr": 1, "flag": "yes", "cache": "none"},
    )
    assert cfg.seeds == (0, 1) and cfg.inputs == ("s2", "s1s2") and cfg.budget == "64"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.flag is True and cfg.cache is None
    assert apply_overrides(_Config(), {"seeds": [3, 4]}).seeds == (3, 4)  # a YAML list
    with pytest.raises(ValueError, match="config key seeds: cannot read 'a,b'"):
        apply_overrides(_Config(), {"seeds": "a,b"})
    with pytest.raises(ValueError, match="config key flag: cannot read 'maybe'"):
        apply_overrides(_Config(), {"flag": "maybe"})


def test_short_keys_are_unique_or_refused_and_sections_can_be_skipped():
    with pytest.raises(
        ValueError, match="'momentum' is ambiguous: it could be optim.momentum or moco.momentum"
    ):
        apply_overrides(_Config(), {"momentum": "0.5"})
    assert apply_overrides(_Config(), {"momentum": "0.5"}, skip_sections=("moco",)).optim.momentum == 0.5
    assert apply_overrides(_Config(), {"optim": "adamw"}).optim.name == "adamw"  # a section: its name
    with pytest.raises(ValueError, match="unknown config key 'seed'; did you mean seeds"):
        apply_overrides(_Config(), {"seed": "1"})


def test_yaml_files_flatten_and_bad_files_name_themselves(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("optim:\n  momentum: 0.8\nseeds: [1, 2]\n")
    assert read_yaml_overrides(good) == {"optim.momentum": 0.8, "seeds": [1, 2]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: a config file must be a mapping"):
        read_yaml_overrides(bad)
    with pytest.raises(ValueError, match="missing.yaml: cannot read the config file"):
        read_yaml_overrides(tmp_path / "missing.yaml")
