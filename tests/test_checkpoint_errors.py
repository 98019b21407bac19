"""Bad checkpoints give one clear sentence naming the problem, never a deep stack trace."""

from __future__ import annotations

import pickle

import pytest
import torch

import clipforge
from clipforge.errors import CheckpointError, ClipforgeError
from clipforge.models.config import config_from_dict
from conftest import TINY_RESNET, TINY_VIT


@pytest.fixture
def tiny():
    return clipforge.create_model(config_from_dict(TINY_VIT)).eval()


@pytest.mark.parametrize("format", ["clipforge", "torch"])
def test_truncated_checkpoint(tiny, tmp_path, format):
    if format == "clipforge":
        path = clipforge.save(tiny, tmp_path / "m.safetensors")
    else:
        path = tmp_path / "m.pt"
        torch.save(tiny.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        clipforge.load(path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        clipforge.load(tmp_path / "empty.pt")


def test_mismatched_shapes_name_the_keys(tiny, tmp_path):
    state = tiny.state_dict()
    state["visual.proj"] = torch.zeros(128, 40)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"visual\.proj|text_projection") as error:
        clipforge.load(path, model=TINY_VIT)
    assert "\n" not in str(error.value)


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
    state = tiny.state_dict()
    del state["ln_final.bias"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing keys ln_final.bias; unexpected keys extra.weight"):
        clipforge.load(tmp_path / "bad.pt", model=TINY_VIT)


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError, match="will not unpickle|truncated or corrupt"):
        clipforge.load(tmp_path / "evil.pt")


def test_not_a_clip_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not in OpenAI's CLIP layout"):
        clipforge.load(tmp_path / "other.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        clipforge.load(tmp_path / "folder")


def test_hugging_face_weights_without_config(tiny, tmp_path):
    clipforge.save(tiny, tmp_path / "hf", format="hf")
    with pytest.raises(CheckpointError, match="config.json"):
        clipforge.load(tmp_path / "hf" / "model.safetensors")


def test_resnet_cannot_be_written_as_hugging_face(tmp_path):
    model = clipforge.create_model(config_from_dict(TINY_RESNET))
    with pytest.raises(CheckpointError, match="no ResNet"):
        clipforge.save(model, tmp_path / "hf", format="hf")


def test_unsupported_open_clip_option_is_named(tiny, tmp_path):
    import json

    clipforge.save(tiny, tmp_path / "oc", format="open_clip")
    config_path = tmp_path / "oc" / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"]["vision_cfg"]["qk_norm"] = True  # open_clip's custom attention block
    config_path.write_text(json.dumps(config))
    with pytest.raises(ClipforgeError, match=r"vision_cfg\.qk_norm") as error:
        clipforge.load(tmp_path / "oc")
    assert "\n" not in str(error.value)


def test_compiled_and_ddp_prefixes_are_stripped(tiny, tmp_path):
    state = {f"module._orig_mod.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "ddp.pt")
    loaded, _ = clipforge.load(tmp_path / "ddp.pt", model=TINY_VIT)
    assert torch.equal(loaded.text_projection, tiny.text_projection)


def test_save_is_atomic_on_failure(tiny, tmp_path, monkeypatch):
    target = clipforge.save(tiny, tmp_path / "m.safetensors")
    before = target.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        clipforge.save(tiny, target)
    assert target.read_bytes() == before  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_all_errors_are_clipforge_errors():
    assert issubclass(CheckpointError, ClipforgeError)


def test_openai_positional_signature_is_accepted(tiny, tmp_path):
    path = clipforge.save(tiny, tmp_path / "m.safetensors")
    model, _ = clipforge.load(str(path), "cpu", False, str(tmp_path))  # clip.load(name, device, jit, download_root)
    assert torch.equal(model.visual.proj, tiny.visual.proj)
    with pytest.raises(ClipforgeError, match="jit=False"):
        clipforge.load(str(path), "cpu", True)
