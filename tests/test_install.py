"""Installing eossl where users run it: ranges vs the tested set, the DALI extras, the container recipe,
the packaged study files.

The container cannot be built here; what it runs can: its pip command is run in dry mode against this
environment (whose torch stands in for the image's), and everything it names must exist in the project.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a pip freeze file (comments skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return reqs


def test_dependencies_are_ranges_and_torch_has_no_upper_bound():
    for req in _requirements():
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req} is a pin"
    torch = {canonicalize_name(r.name): r for r in _requirements()}
    for name in ("torch", "torchvision"):
        operators = {spec.operator for spec in torch[name].specifier}
        assert operators == {">="}, f"{torch[name]}: a lower bound only, so an installed torch is kept"


def test_the_tested_set_satisfies_every_range():
    """constraints.txt pins inside pyproject's ranges (pip would refuse the install otherwise)."""
    pins = _pins(REPO / "constraints.txt")
    assert "eossl" not in pins
    for req in _requirements(("test", "cuda13")):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt: {req.name} is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} not in {req}"


def test_the_dali_extras_name_one_build_per_cuda_major():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [canonicalize_name(Requirement(r).name) for r in extras["cuda12"]] == ["nvidia-dali-cuda120"]
    assert [canonicalize_name(Requirement(r).name) for r in extras["cuda13"]] == ["nvidia-dali-cuda130"]
    assert not [r for r in _requirements() if "dali" in r.name], "DALI belongs in the extras only"


def test_the_makefile_installs_the_tested_set():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^EXTRAS \?= test,cuda13$", makefile, re.M)
    assert "pip install --no-compile -e '.[$(EXTRAS)]' -c constraints.txt" in makefile


def test_the_installed_environment_is_byte_compiled():
    """``make install`` compiles every module once: where PYTHONDONTWRITEBYTECODE is set (CI images,
    containers), a module without its .pyc is compiled from source again by every process that imports
    it, which made each training process 3x dearer to start."""
    import importlib.util

    import mlflow
    import timm
    import torch
    import torch._dynamo

    import eossl.streaming.loader
    import eossl.train.loop

    modules = (torch, torch._dynamo, mlflow, timm, eossl.streaming.loader, eossl.train.loop)
    compiled = {m.__name__: Path(importlib.util.cache_from_source(m.__file__)).is_file() for m in modules}
    missing = [name for name, ok in compiled.items() if not ok]
    assert not missing, f"no .pyc beside {missing}: make install did not byte-compile the environment"


_BLOCK_DALI = "import sys; sys.modules['nvidia.dali'] = None\n"


def test_without_dali_the_package_imports_and_the_loader_names_the_extras():
    """A plain ``pip install eossl`` (no extra): everything but the DALI graph imports; the graph's import
    fails with the extras and the drivers they need."""
    code = _BLOCK_DALI + (
        "import eossl.streaming.loader, eossl.train.loop, eossl.launch.cli\n"
        "try:\n"
        "    import eossl.streaming.dali_pipeline\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('imported without DALI')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout
    for text in ("pip install 'eossl[cuda13]'", "driver >= 580", "pip install 'eossl[cuda12]'", "525.60"):
        assert text in message, message


def test_building_a_loader_without_dali_raises_the_install_hint(dataset):
    code = _BLOCK_DALI + (
        "from eossl.streaming.loader import LoaderConfig, SSLLoader\n"
        f"loader = SSLLoader({str(dataset)!r}, LoaderConfig(batch_size=4, device='cpu', workers=0))\n"
        "next(iter(loader))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ImportError: the eossl loader needs NVIDIA DALI" in proc.stderr, proc.stderr[-3000:]
    assert "eossl[cuda12]" in proc.stderr


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _dockerfile() -> tuple[dict[str, str], str]:
    """The Dockerfile's ARG defaults and its RUN command (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (run,) = re.findall(r"^RUN (.+)$", text, re.M)
    return args, run


def test_the_dockerfile_installs_a_named_extra_within_the_tested_set():
    args, run = _dockerfile()
    assert args["EXTRA"] in PYPROJECT["project"]["optional-dependencies"]
    assert args["EXTRA"] in ("cuda12", "cuda13")
    install = [step for step in run.split("&&") if "pip install" in step]
    assert len(install) == 1 and '-e ".[${EXTRA}]" -c /tmp/tested.txt' in install[0], install
    assert "constraints.txt" in run and "torch" in run
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    from eossl.launch.cluster import ClusterJob

    repo = {f.name: f.default for f in dataclasses.fields(ClusterJob)}["repo"]
    assert workdir == repo, "the Kubernetes kit runs node.sh from its --repo default"


@pytest.mark.slow
def test_the_dockerfile_install_resolves_and_keeps_the_installed_torch(tmp_path):
    """The Dockerfile's RUN line, run here with ``pip install --dry-run`` for each extra: the tested set
    minus torch plus the installed torch resolves, and pip would not install torch or torchvision."""
    args, run = _dockerfile()
    run = run.replace("/tmp/", f"{tmp_path}/").replace("--no-cache-dir", "--dry-run --no-cache-dir")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for extra in ("cuda12", "cuda13"):
        proc = subprocess.run(
            ["bash", "-c", f"set -euo pipefail; {run}"],
            cwd=REPO,
            env={**env, "EXTRA": extra},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (would,) = [line for line in proc.stdout.splitlines() if line.startswith("Would install")]
        assert not re.search(r"\b(torch|torchvision)-\d", would), would
        dali = f"nvidia-dali-cuda{'120' if extra == 'cuda12' else '130'}"
        assert dali in would or _installed(dali), would


def test_a_packaged_study_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from eossl.launch.study.config import find_study, load_study, packaged_studies

    monkeypatch.chdir(tmp_path)
    assert {"demo_batch_epochs", "moco_batch_epochs"} <= set(packaged_studies())
    cfg = load_study("demo_batch_epochs")
    assert cfg.name == "demo-batch-epochs"
    assert cfg.data == str(tmp_path / "demo-output" / "dataset")  # relative to where it is run
    assert load_study("demo_batch_epochs.yaml").digest() == cfg.digest()

    own = tmp_path / "demo_batch_epochs.yaml"  # a user's file of the same name wins
    own.write_text("name: mine\ndata: d\nout: o\ngrid: {epochs: [1]}\n")
    assert find_study("demo_batch_epochs.yaml").resolve() == own
    assert load_study("demo_batch_epochs.yaml").name == "mine"

    with pytest.raises(ValueError, match=r"nope: no such study file.*demo_batch_epochs"):
        load_study("nope")
    with pytest.raises(ValueError, match="sub/demo_batch_epochs.yaml: no such study file"):
        load_study("sub/demo_batch_epochs.yaml")


def test_the_study_command_finds_a_packaged_study_by_name(tmp_path):
    """From a folder that is not a checkout: the study is found, then stops at the missing dataset."""
    proc = subprocess.run(
        [sys.executable, "-m", "eossl.launch", "study", "--config", "demo_batch_epochs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    assert proc.returncode != 0
    assert str(tmp_path / "demo-output" / "dataset") in proc.stderr, proc.stderr[-3000:]
    assert "no such study file" not in proc.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_study_files_and_kits(tmp_path):
    """Built from a copy of the sources (a build writes into its source folder)."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("eossl", "ingest", "streaming", "train", "eval", "launch"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("eossl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for study in (REPO / "launch" / "studies").glob("*.yaml"):
        assert f"eossl/launch/studies/{study.name}" in names
    assert "eossl/launch/kits/node.sh" in names
    assert "eossl/__init__.py" in names and "eossl/streaming/torchgeo_style.py" in names
