"""Model names, weights files (never unpickled unsafely), heads and data configs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn
from safetensors.torch import save_file

from codeq_cli.errors import ModelError, UsageError
from codeq_cli.models.factory import (
    ModelSpec,
    create,
    data_config,
    load_model,
    load_weights,
    num_outputs,
    read_state_dict,
    resolve,
)


@pytest.mark.parametrize(
    "name, source, bare",
    [
        ("resnet18", "torchvision", "resnet18"),  # torchvision first for bare names
        ("tv:resnet18", "torchvision", "resnet18"),
        ("torchvision:mobilenet_v2", "torchvision", "mobilenet_v2"),
        ("timm:resnet18", "timm", "resnet18"),
        ("convnext_atto", "timm", "convnext_atto"),  # only timm has it
        ("timm:resnet18.a1_in1k", "timm", "resnet18.a1_in1k"),  # pretrained tags pass through
    ],
)
def test_resolve(name, source, bare):
    spec = resolve(name)
    assert (spec.source, spec.name) == (source, bare)


@pytest.mark.parametrize("name", ["resnet181", "tv:resnet181", "timm:convnext_atoo"])
def test_unknown_names_list_close_matches(name):
    with pytest.raises(UsageError) as info:
        resolve(name)
    msg = str(info.value)
    assert "unknown model" in msg and "close matches" in msg and "\n" not in msg
    assert ("resnet18" in msg) or ("convnext_atto" in msg)


def test_unknown_prefix():
    with pytest.raises(UsageError, match="prefix 'foo'"):
        resolve("foo:bar")


def test_heads_follow_num_classes():
    assert num_outputs(create(ModelSpec("torchvision", "resnet18", num_classes=7))) == 7
    assert num_outputs(create(ModelSpec("timm", "test_resnet", num_classes=5))) == 5
    assert num_outputs(create(ModelSpec("torchvision", "squeezenet1_0", num_classes=4))) == 4


def test_data_config_follows_the_model():
    tv = data_config(create(ModelSpec("torchvision", "resnet18")), ModelSpec("torchvision", "resnet18"))
    assert tv.input_size == (3, 224, 224) and tv.crop_pct == pytest.approx(224 / 256) and tv.interpolation == "bilinear"
    spec = ModelSpec("timm", "vit_tiny_patch16_224")
    cfg = data_config(create(spec), spec)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.interpolation == "bicubic" and cfg.crop_pct == pytest.approx(0.9)


def test_a_fixed_size_torchvision_model_built_without_weights_takes_its_own_size():
    # vit_h_14's default (SWAG) weights are for 518x518, but without them torchvision builds it for 224x224.
    spec = ModelSpec("torchvision", "vit_h_14")
    built = nn.Module()
    built.image_size = 224  # what torchvision.models.vit_h_14() sets (building the 632M model here is too slow)
    cfg = data_config(built, spec)
    assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == pytest.approx(518 / 518)
    built.image_size = 518  # built with the weights: as they say
    assert data_config(built, spec).input_size == (3, 518, 518)


@pytest.mark.parametrize("source, name", [("torchvision", "resnet18"), ("timm", "test_resnet")])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_files_of_both_layouts_load(tmp_path, source, name, suffix):
    spec = ModelSpec(source, name)
    ref = create(spec)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # DDP-style wrapper
    else:
        save_file(sd, str(path))
    model = create(spec)
    load_weights(model, path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_mismatched_weights_name_the_keys(tmp_path):
    tv = create(ModelSpec("torchvision", "resnet18"))
    path = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_weights(create(ModelSpec("timm", "test_resnet")), path)
    msg = str(info.value)
    assert "do not fit" in msg and ("missing" in msg or "shape of" in msg) and "\n" not in msg


def test_new_head_keeps_backbone_and_skips_old_head(tmp_path):
    ref = create(ModelSpec("torchvision", "resnet18"))
    path = tmp_path / "w.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(ModelError, match="--num-classes"):
        load_weights(create(ModelSpec("torchvision", "resnet18", num_classes=3)), path)
    model = create(ModelSpec("torchvision", "resnet18", num_classes=3))
    skipped = load_weights(model, path, new_head=True)
    assert set(skipped) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.conv1.weight, ref.conv1.weight) and model.fc.out_features == 3


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_crafted_to_run_code_are_refused_and_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Evil(str(marker))}, fh)
    with pytest.raises(ModelError, match="cannot be read as a state dict"):
        read_state_dict(path)
    assert not marker.exists()


def test_weights_file_problems(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not really")
    with pytest.raises(ModelError, match="safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")


def test_load_model_notes_and_image_size():
    loaded = load_model("timm:test_resnet", pretrained=False, num_classes=4, img_size=48)
    assert loaded.weights == "random" and loaded.data.input_size == (3, 48, 48)
    assert loaded.notes == []  # the name was already the canonical one: nothing to say
