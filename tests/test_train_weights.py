"""Starting weights in, timm folders out: a run starts from a local timm file or a 13-band file keyed as
the SSL4EO-S12/torchgeo weights, the weights' normalisation is applied and recorded, the export loads
through ``timm.create_model("local-dir:...")`` with eossl's per-channel normalisation, weights files are
evaluated as table rows, and what cannot be loaded fails naming the file and why."""

from __future__ import annotations

import importlib.util
import json

import mlflow
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from eossl.ingest.bands import S2
from eossl.streaming.inputs import InputSpec
from eossl.train.backbones import build_encoder
from eossl.train.config import BackboneConfig, load_config
from eossl.train.input_norm import input_norm
from eossl.train.methods import get_method
from eossl.train.weights import apply_starting_weights, load_into_backbone, read_starting_weights

from conftest import TINY_MOCO

LAND = InputSpec.parse("s2", "land").channel_names  # TINY_MOCO's input: the 10 land bands


def _state(name: str, in_chans: int, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        k: v.clone() for k, v in timm.create_model(name, in_chans=in_chans, **kwargs).state_dict().items()
    }


def _manifest(dataset) -> dict:
    return json.loads((dataset / "manifest.json").read_text())


def _cfg(dataset, run, **extra):
    return load_config(
        "moco",
        None,
        {**TINY_MOCO, "data": str(dataset), "out": str(run), "max_steps": "2", "ckpt_every": "0", **extra},
    )


def _moco(cfg):
    return get_method("moco").build(cfg, [len(LAND), len(LAND)], "single")


def _train(cfg, tmp_path, monkeypatch):
    from eossl.train.loop import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store: ./mlflow.db
    result = train(cfg, resume=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return result, client.get_run(result.mlflow_run_id).data.tags


def test_a_run_starts_from_a_local_timm_file_and_exports_a_timm_folder(dataset, tmp_path, monkeypatch):
    # An ImageNet-shaped checkpoint (3 channels, a 1000-class fc) saved by DDP: under state_dict, module.
    state = _state("resnet18", 3, seed=1)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    cfg = _cfg(dataset, tmp_path / "run", weights=str(path), weights_input="unknown")

    method = _moco(cfg)
    weights = read_starting_weights(str(path), "unknown")
    report = apply_starting_weights(method, weights, [LAND, LAND])
    assert "adapt_input_conv: 3 -> 10" in report["first_layer"] and report["dropped_keys"] == [
        "fc.bias",
        "fc.weight",
    ]
    # timm's documented adaptation, from its definition: RGB columns repeated over C channels, scaled 3/C.
    w = state["conv1.weight"].double()
    reference = torch.stack([w[:, j % 3] for j in range(10)], dim=1) * (3 / 10)
    for encoder in (method.encoder_q, method.encoder_k):  # the key encoder starts from the same weights
        got = encoder.backbone.state_dict()
        torch.testing.assert_close(got["conv1.weight"].double(), reference, rtol=1e-6, atol=1e-7)
        assert torch.equal(got["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])

    result, tags = _train(cfg, tmp_path, monkeypatch)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    folder = result.backbone_dir
    card = json.loads((folder / "model_card.json").read_text())
    assert card["starting_weights"]["source"] == str(path) and card["starting_weights"]["input"] == "unknown"
    assert json.loads(tags["eossl.starting_weights"])["sha256"] == card["starting_weights"]["sha256"]
    # The weights declare no normalisation: the dataset's, recorded as such.
    mean, std = InputSpec.parse("s2", "land").normalisation(_manifest(dataset))
    assert card["inputs"]["view0"]["normalisation_source"] == ["dataset"] * 10
    np.testing.assert_allclose(card["inputs"]["view0"]["mean"], mean, rtol=1e-6)

    # The export is a timm model folder: timm alone builds it, with its weights and eossl's normalisation.
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert model.num_classes == 0 and model.num_features == card["feature_dim"] == 512
    exported = load_file(str(folder / "backbone.safetensors"))
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    data = timm.data.resolve_data_config(model=model)
    np.testing.assert_allclose(data["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(data["std"], std, rtol=1e-6)
    assert data["input_size"][0] == 10 and model(torch.zeros(1, 10, 64, 64)).shape == (1, 512)
    assert (folder / "model.safetensors").read_bytes() == (folder / "backbone.safetensors").read_bytes()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(result.mlflow_run_id, "backbone")}
    assert {"backbone/config.json", "backbone/model.safetensors", "backbone/model_card.json"} <= logged

    # That run is itself a starting point: its export, channels and normalisation from its card.
    again = read_starting_weights(str(result.run_dir))
    assert (
        again.kind == "eossl"
        and again.channels == LAND
        and again.stats["s2:B4"]
        == pytest.approx((mean[LAND.index("s2:B4")], std[LAND.index("s2:B4")]), rel=1e-5)
    )
    fresh = _moco(_cfg(dataset, tmp_path / "run2", weights=str(result.run_dir)))
    assert apply_starting_weights(fresh, again, [LAND, LAND])["first_layer"] == "as stored"
    assert all(
        torch.equal(v, exported[k]) for k, v in fresh.encoder_q.backbone.state_dict().items() if k in exported
    )


def _ssl4eo_moco_checkpoint(path, state: dict[str, torch.Tensor]) -> None:
    """A file keyed as the SSL4EO-S12 MoCo checkpoints: query and key encoders, projection MLP, queue."""
    ckpt = {f"module.encoder_q.{k}": v for k, v in state.items()}
    ckpt.update({f"module.encoder_k.{k}": v + 1 for k, v in state.items()})
    ckpt["module.encoder_q.fc.0.weight"] = torch.randn(512, 512)
    ckpt["module.encoder_q.fc.2.weight"] = torch.randn(128, 512)
    ckpt["module.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 99, "arch": "resnet18", "state_dict": ckpt}, path)


def test_a_run_starts_from_13_band_ssl4eo_weights_in_their_normalisation(dataset, tmp_path, monkeypatch):
    state = _state("resnet18", 13, seed=2, num_classes=0)
    path = tmp_path / "B13_rn18_moco_0099_ckpt.pth"
    _ssl4eo_moco_checkpoint(path, state)
    cfg = _cfg(dataset, tmp_path / "run", weights=str(path), weights_input="ssl4eo_s2")

    method = _moco(cfg)
    weights = read_starting_weights(str(path), "ssl4eo_s2")
    report = apply_starting_weights(method, weights, [LAND, LAND])
    assert "dropped (not in the input): ['s2:B1', 's2:B9', 's2:B10']" in report["first_layer"]
    # The input's 10 bands take the columns of the same bands of the 13-band first layer.
    cols = [S2.bands.index(c.split(":")[1]) for c in LAND]
    assert torch.equal(method.encoder_q.backbone.conv1.weight, state["conv1.weight"][:, cols])
    assert torch.equal(method.encoder_q.backbone.layer3[0].bn1.running_var, state["layer3.0.bn1.running_var"])

    # Normalisation: the weights expect reflectance / 10,000; the loader standardises with the dataset's
    # statistics, and the affine in between must give exactly v / 10000 (float64 reference).
    manifest = _manifest(dataset)
    d_mean, d_std = InputSpec.parse("s2", "land").normalisation(manifest)
    norm = input_norm([LAND, LAND], [(d_mean, d_std)] * 2, "auto", weights)
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 6000, size=(2, 10, 4, 4))
    x = (raw - d_mean.astype(np.float64)[None, :, None, None]) / d_std.astype(np.float64)[None, :, None, None]
    got = norm.apply([torch.tensor(x, dtype=torch.float32)] * 2)[0].double().numpy()
    np.testing.assert_allclose(got, raw / 10000, rtol=1e-5, atol=1e-6)
    assert input_norm([LAND], [(d_mean, d_std)], "dataset", weights).identity  # the documented choice

    result, tags = _train(cfg, tmp_path, monkeypatch)
    assert result.steps == 2 and np.isfinite(result.final_loss)
    card = json.loads((result.backbone_dir / "model_card.json").read_text())
    view0 = card["inputs"]["view0"]
    assert view0["mean"] == [0.0] * 10 and view0["std"] == [10000.0] * 10
    assert view0["normalisation_source"] == ["weights"] * 10
    assert json.loads(tags["eossl.input_norm"])["std"][0] == [10000.0] * 10
    assert "divided by 10,000" in card["starting_weights"]["input_about"]
    readme = (result.backbone_dir / "README.md").read_text()
    assert "input ssl4eo_s2" in readme and f"| {[10000.0] * 10} |" in readme
    model = timm.create_model(f"local-dir:{result.backbone_dir}", pretrained=True)
    data = timm.data.resolve_data_config(model=model)
    assert tuple(data["mean"]) == (0.0,) * 10 and tuple(data["std"]) == (10000.0,) * 10


def test_vit_weights_under_dino_wrappers_load_into_a_two_band_s1_vit(tmp_path):
    state = _state("vit_tiny_patch16_224", 2, seed=3, num_classes=0)
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in state.items()}}
    ckpt["teacher"]["module.head.mlp.0.weight"] = torch.randn(64, 192)
    path = tmp_path / "B2_vits16_dino.pth"
    torch.save(ckpt, path)
    weights = read_starting_weights(str(path), "ssl4eo_s1")
    assert weights.stats == {"s1:VV": (-12.59, 5.26), "s1:VH": (-20.26, 5.91)}
    encoder = build_encoder(BackboneConfig(name="vit_tiny_patch16_224"), {"input": 2})
    report = load_into_backbone(encoder.backbone, weights, ["s1:VV", "s1:VH"], 2)
    assert report["first_layer"] == "as stored"
    assert all(torch.equal(v, state[k]) for k, v in encoder.backbone.state_dict().items())


def test_timm_names_load_from_the_local_cache_and_a_download_is_refused(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="does not download") as err:
        read_starting_weights("timm:resnet18.a1_in1k")
    assert "resnet18_a1_0-d63eafa0.pth" in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(ValueError, match="no pretrained weights of that name"):
        read_starting_weights("timm:resnet18.no_such_tag")

    # The same name with its file in torch's hub cache: read by timm's loader, nothing downloaded.
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18_a1_0-d63eafa0.pth"
    cached.parent.mkdir(parents=True)
    state = _state("resnet18", 3, seed=4)
    torch.save(state, cached)
    weights = read_starting_weights("timm:resnet18.a1_in1k")
    assert weights.kind == "timm" and weights.channels == ["s2:B4", "s2:B3", "s2:B2"]
    assert torch.equal(weights.state["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert "fc.weight" not in weights.state  # timm dropped the classifier (num_classes=0)


def test_weights_that_do_not_fit_fail_naming_the_file_and_the_keys(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    save_file(_state("resnet34", 13, seed=5, num_classes=0), str(path))
    encoder = build_encoder(BackboneConfig(name="resnet18"), {"input": 10})
    weights = read_starting_weights(str(path), "ssl4eo_s2")
    with pytest.raises(ValueError, match="unexpected") as err:
        load_into_backbone(encoder.backbone, weights, LAND, 10)
    assert str(path) in str(err.value) and "layer1.2.bn1.bias" in str(err.value)

    with pytest.raises(ValueError, match="backbone.weights_input") as err:  # a plain file must say its input
        read_starting_weights(str(path))
    assert "ssl4eo_s2?" in str(err.value)
    with pytest.raises(ValueError, match="no such file or folder"):
        read_starting_weights(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        read_starting_weights(str(garbage), "ssl4eo_s2")
    with pytest.raises(ValueError, match="normalisation=weights"):
        input_norm([LAND], [(np.zeros(10), np.ones(10))], "weights", None)


def test_a_weights_file_is_evaluated_as_a_row_next_to_random_init(dataset, tmp_path, monkeypatch):
    from eossl.eval.checkpoints import checkpoint_source
    from eossl.eval.classify import ClassifyConfig, run_classification
    from eossl.eval.models import build_eval_encoder
    from eossl.streaming.zarr_dataset import ZarrPatchDataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "resnet18_sentinel2_all_moco-0000.pth"  # torchgeo's naming: the architecture first
    state = _state("resnet18", 13, seed=6, num_classes=0)
    torch.save(state, path)
    with pytest.raises(ValueError, match="name the input the weights were trained on"):
        checkpoint_source(str(path))  # checked before any cell runs

    cfg = ClassifyConfig(
        dataset=str(dataset),
        out=str(tmp_path / "eval"),
        checkpoints=(f"{path}@ssl4eo_s2",),
        inputs=("s2",),
        s2_bands="all",
        budget="4",
        protocol="knn",
    )
    result = run_classification(cfg)
    rows = {c["method"]: c for c in result["cells"]}
    assert set(rows) == {"random init", f"{path.stem}-ssl4eo_s2"}
    assert all(c["mean"] is not None and not c["note"] for c in rows.values())
    folder = tmp_path / "eval" / "backbones" / f"{path.stem}-ssl4eo_s2"
    card = json.loads((folder / "backbone" / "model_card.json").read_text())
    assert card["timm_model"] == "resnet18" and card["inputs"]["view0"]["std"] == [10000.0] * 13

    # The evaluated encoder sees the weights' normalisation: v / 10000 of the stored values.
    spec = InputSpec.parse("s2", "all")
    ds = ZarrPatchDataset(str(dataset), spec, rows="test", label=None)
    model = build_eval_encoder("checkpoint", spec.channel_names, ds.mean, ds.std, str(folder))
    assert torch.equal(model.encoder.backbone.conv1.weight, state["conv1.weight"])
    x = ds[0]["x"][None]
    raw = (
        x.double() * torch.as_tensor(ds.std, dtype=torch.float64)[None, :, None, None]
        + torch.as_tensor(ds.mean, dtype=torch.float64)[None, :, None, None]
    )
    torch.testing.assert_close(model.prepare(x).double(), raw / 10000, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec("torchgeo") is None,
    reason="torchgeo is not installed (installing it would change the pinned torch/timm stack)",
)
def test_a_torchgeo_trainer_takes_an_exported_backbone(tmp_path):  # the README's route
    from torchgeo.trainers import ClassificationTask

    path = tmp_path / "model.safetensors"
    save_file(_state("resnet18", 10, seed=7, num_classes=0), str(path))
    task = ClassificationTask(model="resnet18", weights=None, in_channels=10, num_classes=10)
    missing, unexpected = task.model.load_state_dict(load_file(str(path)), strict=False)
    assert set(missing) <= {"fc.weight", "fc.bias"} and not unexpected
    assert torch.equal(task.model.conv1.weight, load_file(str(path))["conv1.weight"])


@pytest.mark.parametrize(
    ("backbone", "adapter", "timm_kwargs"),
    [("vit_tiny_patch16_224", "native", {"dynamic_img_size": True}), ("resnet18", "conv1x1", {})],
)
def test_every_export_loads_through_timm_local_dir(dataset, tmp_path, backbone, adapter, timm_kwargs):
    """A DINO-style ViT (any image size) and a backbone behind 1x1 adapters, exported without training."""
    from types import SimpleNamespace

    from eossl.streaming.views import ViewConfig, ViewSet
    from eossl.train.config import TrainConfig
    from eossl.train.export import export_backbone

    spec = InputSpec.parse("s1")
    cfg = TrainConfig(
        data=str(dataset), out=str(tmp_path), backbone=BackboneConfig(name=backbone, adapter=adapter)
    )
    encoder = build_encoder(cfg.backbone, {"input": spec.channels}, **timm_kwargs)
    loader = SimpleNamespace(views=ViewSet(ViewConfig(inputs=spec)), manifest=_manifest(dataset))
    folder = export_backbone(encoder, loader, cfg, 0, tmp_path)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert all(torch.equal(v, encoder.backbone.state_dict()[k]) for k, v in model.state_dict().items())
    data = timm.data.resolve_data_config(model=model)
    if adapter == "conv1x1":  # the backbone takes the adapter's output; the card says what the adapter takes
        assert tuple(data["mean"]) == (0.0,) * 3 and tuple(data["std"]) == (1.0,) * 3
        assert (folder / "adapters.safetensors").exists()
    else:
        mean, std = spec.normalisation(_manifest(dataset))
        np.testing.assert_allclose(data["mean"], mean, rtol=1e-6)
        np.testing.assert_allclose(data["std"], std, rtol=1e-6)
        x = torch.randn(1, 2, 32, 48)  # dynamic_img_size: another size than the architecture's 224
        model.eval(), encoder.eval()
        torch.testing.assert_close(model(x), encoder.backbone(x))
