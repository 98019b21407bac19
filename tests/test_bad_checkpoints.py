"""A corpus of damaged, hand-edited and misplaced checkpoints, and failed writes.

Each must end in one ClipforgeError sentence naming the file (never a traceback, never silently
damaged weights), and a failed write must leave the previous files intact and no temporary behind.
The bad inputs are built here at test time from a micro model, so the whole file runs in seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import safetensors.torch
import torch

import clipforge
from clipforge.checkpoints.atomic import atomic_write, is_temp_file, remove_stale_temp_files
from clipforge.checkpoints.weights import read_weights_file
from clipforge.cli.main import main as cli
from clipforge.errors import ClipforgeError
from clipforge.models.config import config_from_dict
from clipforge.training.checkpointing import save_checkpoint

MICRO = {"embed_dim": 32, "quick_gelu": True,
         "vision": {"type": "vit", "image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "heads": 1},
         "text": {"context_length": 16, "vocab_size": 512, "width": 64, "layers": 1, "heads": 1}}


def check_message(error: BaseException, name: str, match: str | None = None) -> None:
    """The rule for every user error: a ClipforgeError, one line, at most 300 characters, naming the input."""
    message = str(error)
    assert isinstance(error, ClipforgeError), repr(error)
    assert "\n" not in message and len(message) <= 300 and name in message, message
    assert match is None or re.search(match, message), message


@contextlib.contextmanager
def refused(name: str, match: str | None = None) -> Iterator[None]:
    with pytest.raises(ClipforgeError) as info:
        yield
    check_message(info.value, name, match)


@pytest.fixture(scope="module")
def micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return clipforge.create_model(config_from_dict(MICRO)).eval()


@pytest.fixture(scope="module")
def saved(micro, tmp_path_factory) -> Path:
    """One copy of the micro model in every format clipforge writes."""
    root = tmp_path_factory.mktemp("saved")
    clipforge.save(micro, root / "m.safetensors")
    clipforge.save(micro, root / "open_clip", format="open_clip")
    clipforge.save(micro, root / "hf", format="hf")
    torch.save(micro.state_dict(), root / "m.pt")
    return root


def copy(saved: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    (shutil.copytree if (saved / name).is_dir() else shutil.copy)(saved / name, target)
    return target


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- 1. config files
HF, PRE, OC = ("hf", "config.json"), ("hf", "preprocessor_config.json"), ("open_clip", "open_clip_config.json")
CONFIG_CASES = [  # (folder, file, raw bytes or an edit of the parsed JSON, what the message must say)
    (*HF, b"\xff\xfe{}", "not UTF-8"), (*HF, b"[1, 2]", "an array"), (*HF, b"42", "a number"),
    (*HF, b"[" * 100_000, "nests"),
    (*HF, lambda d: d["text_config"].update(hidden_size="768"), r"text_config\.hidden_size"),
    (*HF, lambda d: d.update(vision_config=[]), "vision_config"),
    (*HF, lambda d: d.update(architectures=5), "architectures"),
    (*HF, lambda d: d["text_config"].update(hidden_act=["gelu"]), "hidden_act"),
    (*HF, lambda d: d["vision_config"].update(image_size=None), "image_size"),
    (*HF, lambda d: d["text_config"].update(layer_norm_eps=float("nan")), "layer_norm_eps"),
    (*HF, lambda d: d["vision_config"].update(num_hidden_layers="x" * 5000), "num_hidden_layers"),
    (*PRE, b"\x80abc", "not UTF-8"), (*PRE, lambda d: d.update(image_mean="abc"), "image_mean"),
    (*PRE, lambda d: d.update(resample=[3]), "resample"), (*PRE, lambda d: d.update(size="abc"), "size"),
    (*PRE, lambda d: d.update(rescale_factor="x"), "rescale_factor"),
    (*PRE, lambda d: d.update(do_normalize="false"), "do_normalize"),
    (*OC, b"[]", "an array"), (*OC, lambda d: d["model_cfg"].update(vision_cfg=[]), "vision_cfg"),
    (*OC, lambda d: d["model_cfg"]["text_cfg"].update(layers="12"), r"text_cfg\.layers"),
    (*OC, lambda d: d["model_cfg"]["vision_cfg"].update(image_size=None), "image_size"),
    (*OC, lambda d: d["model_cfg"]["vision_cfg"].update(width="768"), r"vision_cfg\.width"),
    (*OC, lambda d: d["model_cfg"].update(quick_gelu="no"), "quick_gelu"),
    (*OC, lambda d: d["preprocess_cfg"].update(mean="abc"), "mean"),
    (*OC, lambda d: d["model_cfg"]["vision_cfg"].update(layers=[[1], 2, 1, 1]), "layers"),
]


@pytest.mark.parametrize("folder,file,bad,says", CONFIG_CASES)
def test_bad_config_file_is_one_sentence_naming_file_and_field(saved, tmp_path, folder, file, bad, says):
    path = copy(saved, folder, tmp_path) / file
    path.write_bytes(bad) if isinstance(bad, bytes) else edit_json(path, bad)
    with refused(file, says):
        clipforge.load(path.parent)


# ---------------------------------------------------------------- 2. sharded indexes
def shard(folder: Path) -> Path:
    """Split the folder's model.safetensors into two shards and an index, as transformers writes them."""
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    keys = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in parts.items():
        safetensors.torch.save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, part in parts.items() for k in part}}))
    return index


def test_sharded_folder_loads(micro, saved, tmp_path):
    shard(copy(saved, "hf", tmp_path))
    model, _ = clipforge.load(tmp_path / "hf")
    assert torch.equal(model.visual.proj, micro.visual.proj)


def remap(shard_name: Any) -> Callable[[dict], None]:
    """An index edit that moves the first tensor to shard_name."""
    return lambda d: d["weight_map"].update({next(iter(d["weight_map"])): shard_name})


INDEX_CASES = [
    (lambda d: d.pop("weight_map"), "weight_map"), (lambda d: d.update(weight_map=["x.safetensors"]), "weight_map"),
    (remap(5), "not a file name"), (remap("../../etc/passwd"), "not a file name"),
    (remap("model-00003-of-00002.safetensors"), "missing"), (remap("model-00002-of-00002.safetensors"), "lacks tensor"),
]


@pytest.mark.parametrize("change,says", INDEX_CASES)
def test_bad_shard_index_is_one_sentence(saved, tmp_path, change, says):
    index = shard(copy(saved, "hf", tmp_path))
    edit_json(index, change)
    with refused("model-0000" if says == "lacks tensor" else index.name, says):
        clipforge.load(tmp_path / "hf")


# ---------------------------------------------------------------- 3. clipforge metadata
@pytest.mark.parametrize("metadata,says", [
    ({"format": "clipforge"}, "stores no model config"),
    ({"format": "clipforge", "config": "{not json"}, "not valid JSON"),
    ({"format": "clipforge", "config": json.dumps({**MICRO, "embed_dim": "32"})}, "embed_dim"),
])
def test_clipforge_file_with_bad_stored_config(micro, tmp_path, metadata, says):
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in micro.state_dict().items()}, path, metadata=metadata)
    with refused("bad.safetensors", says):
        clipforge.load(path)


# ---------------------------------------------------------------- 4. zip integrity
def zero_inside_largest_member(path: Path, count: int = 4096) -> str:
    """Overwrite count bytes inside the data of the archive's largest member, so only its CRC-32 can tell."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    assert info.file_size > count + 64
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", handle.read(30)[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length + 64)
        handle.write(bytes(count))
    return info.filename


def test_damaged_torch_zip_is_refused(saved, tmp_path):
    path = copy(saved, "m.pt", tmp_path)
    member = zero_inside_largest_member(path)
    with refused("m.pt", f"CRC-32 for file '{re.escape(member)}'"):
        clipforge.load(path, model=MICRO)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, yet OpenAI's releases use it
def test_damaged_torchscript_archive_is_refused(tmp_path):
    torch.manual_seed(0)
    module = torch.jit.trace(torch.nn.Linear(64, 64), torch.zeros(1, 64))
    torch.jit.save(module, tmp_path / "scripted.pt")
    assert "weight" in read_weights_file(tmp_path / "scripted.pt")[0]  # intact, it loads
    zero_inside_largest_member(tmp_path / "scripted.pt")
    with refused("scripted.pt", "CRC-32"):
        clipforge.load(tmp_path / "scripted.pt")


def test_truncated_legacy_torch_file_is_refused(micro, tmp_path):
    """Legacy (non-zip) files have no checksum; truncation is what can be detected."""
    path = tmp_path / "legacy.pt"
    torch.save(micro.state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-5000])
    with refused("legacy.pt", "truncated or corrupt"):
        clipforge.load(path, model=MICRO)


# ---------------------------------------------------------------- 5. safetensors layout
def _tampered_offsets(raw: bytes) -> bytes:
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**6
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + length:]


@pytest.mark.parametrize("damage,says", [
    (lambda raw: raw[:-100], "ends at byte"),
    (lambda raw: (10**12).to_bytes(8, "little") + raw[8:], "header claims"),
    (_tampered_offsets, "ends at byte"),
    (lambda raw: raw[:8] + b"{" + b"\xff" * 40 + raw[49:], "not valid JSON"),
])
def test_damaged_safetensors_is_refused(saved, tmp_path, damage, says):
    path = copy(saved, "m.safetensors", tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with refused("m.safetensors", says):
        clipforge.load(path)


# ---------------------------------------------------------------- 6. failed writes
def fail_with(code: int) -> Callable[..., None]:
    def writer(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))
    return writer


@pytest.mark.parametrize("fmt,name", [("clipforge", "m.safetensors"), ("open_clip", "open_clip"), ("hf", "hf")])
def test_full_disk_while_saving_keeps_the_previous_files(micro, saved, tmp_path, monkeypatch, fmt, name):
    target = copy(saved, name, tmp_path)
    before = snapshot(tmp_path) if fmt == "clipforge" else snapshot(target)
    monkeypatch.setattr(safetensors.torch, "save_file", fail_with(errno.ENOSPC))
    with refused(name, "^no space left on device writing .*the previous files? (is|are) intact"):
        clipforge.save(micro, target, format=fmt)
    assert (snapshot(tmp_path) if fmt == "clipforge" else snapshot(target)) == before
    assert not [p for p in tmp_path.rglob("*") if is_temp_file(p)]


def test_folder_save_failing_after_the_weights_keeps_the_old_weights(micro, saved, tmp_path, monkeypatch):
    """A folder is written whole or not at all: new weights never sit beside an old config."""
    target = copy(saved, "hf", tmp_path)
    before = snapshot(target)
    real_write_text = Path.write_text

    def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with refused("config.json", "no space left"):
        clipforge.save(micro, target, format="hf")
    assert snapshot(target) == before and sorted(p.name for p in target.iterdir()) == sorted(before)


@pytest.mark.parametrize("code,says", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_other_write_failures_are_one_sentence(micro, tmp_path, monkeypatch, code, says):
    monkeypatch.setattr(safetensors.torch, "save_file", fail_with(code))
    with refused("new.safetensors", f"^{says} writing .*nothing was written"):
        clipforge.save(micro, tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_convert_exits_2_with_one_line(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(safetensors.torch, "save_file", fail_with(errno.ENOSPC))
    assert cli(["convert", str(saved / "m.safetensors"), str(tmp_path / "out"), "--to", "hf"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no space left on device writing" in error and "out" in error
    assert not (tmp_path / "out").exists()


def test_full_disk_while_writing_a_training_checkpoint(micro, tmp_path, monkeypatch):
    first = save_checkpoint({"model": micro.state_dict(), "step": 1}, tmp_path, 1, keep_last=3)
    before = first.read_bytes()

    def torch_save(*args: Any, **kwargs: Any) -> None:  # torch's zip writer: a RuntimeError, the OSError its context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_save)
    with refused("step_00000002.pt", "^no space left on device"):
        save_checkpoint({"model": micro.state_dict(), "step": 2}, tmp_path, 2, keep_last=3)
    assert first.read_bytes() == before
    assert [p.name for p in first.parent.iterdir()] == [first.name]


# ---------------------------------------------------------------- 7. stale temporaries
def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    seen: list[Path] = []
    atomic_write(tmp_path / "m.safetensors", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".m.safetensors.tmp-") and is_temp_file(seen[0])
    stale = [tmp_path / n for n in (".step_00000100.pt.tmp-abcd1234", ".m.safetensors.x1y2z3_4.tmp", ".tmp-k2j4h5g6")]
    kept = [tmp_path / n for n in ("m.safetensors", "notes.tmp", ".hidden", "x.tmp-abcd1234")]
    for path in stale[:2] + kept[1:]:
        path.write_bytes(b"half a checkpoint, or user data")
    stale[2].mkdir()
    (stale[2] / "model.safetensors").write_bytes(b"half a folder")
    assert sorted(remove_stale_temp_files(tmp_path, min_age_s=3600)) == []  # all just written
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temp_files(tmp_path / "missing") == []


# ---------------------------------------------------------------- 8. umask
def test_written_files_follow_the_umask(micro, tmp_path):
    old = os.umask(0o027)
    try:
        path = clipforge.save(micro, tmp_path / "m.safetensors")
        folder = clipforge.save(micro, tmp_path / "hf", format="hf")
        checkpoint = save_checkpoint({"model": micro.state_dict()}, tmp_path / "run", 1, keep_last=1)
        os.chmod(path, 0o600)
        clipforge.save(micro, path)  # rewriting keeps the file's own mode, as open() would
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(checkpoint.stat().st_mode & 0o777) == oct(0o640)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o640)}


# ---------------------------------------------------------------- 9. convert destinations
def test_convert_refuses_to_overwrite_unless_asked(micro, saved, tmp_path, capsys):
    source = str(saved / "m.safetensors")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    existing = copy(saved, "m.safetensors", tmp_path)
    cases = [([source, str(tmp_path / "busy"), "--to", "hf"], "busy", "not empty"),
             ([source, str(existing), "--to", "clipforge"], "m.safetensors", "already exists"),
             ([source, source, "--to", "clipforge", "--overwrite"], "m.safetensors", "is the source"),
             ([str(saved / "hf"), str(saved / "hf"), "--to", "hf", "--overwrite"], "hf", "is the source"),
             ([str(saved / "m.pt"), str(saved), "--to", "open_clip", "--overwrite"], "m.pt", "folder holding it"),
             ([source, str(existing), "--to", "hf", "--overwrite"], "m.safetensors", "writes a folder")]
    for argv, name, says in cases:
        assert cli(["convert", *argv]) == 2, argv
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and name in error and says in error, error
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and existing.read_bytes() == (
        saved / "m.safetensors").read_bytes()
    assert cli(["convert", source, str(tmp_path / "busy"), "--to", "hf", "--overwrite"]) == 0
    assert torch.equal(clipforge.load(tmp_path / "busy")[0].visual.proj, micro.visual.proj)


# ---------------------------------------------------------------- 10. everything else
def test_files_that_are_not_weights(saved, tmp_path):
    (tmp_path / "text.bin").write_text("hello, I am a text file\n")
    with refused("text.bin", "not a PyTorch, TorchScript or safetensors file"):
        clipforge.load(tmp_path / "text.bin", model=MICRO)
    hf = copy(saved, "hf", tmp_path)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9\n")
    with refused("pytorch_model.bin", "git lfs pull"):
        clipforge.load(hf)
    with refused("hf", "is a folder"):
        read_weights_file(hf)
    os.mkfifo(tmp_path / "pipe.pt")
    with refused("pipe.pt", "not a regular file"):
        clipforge.load(tmp_path / "pipe.pt", model=MICRO)


def test_dangling_symlinks(saved, tmp_path):
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    with refused("link.pt"):
        clipforge.load(tmp_path / "link.pt")
    hf = copy(saved, "hf", tmp_path)  # a hub cache whose blob was deleted
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").symlink_to(tmp_path / "blobs" / "0123abcd")
    with refused("model.safetensors", "symbolic link"):
        clipforge.load(hf)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_checkpoint(saved, tmp_path):
    path = copy(saved, "m.safetensors", tmp_path)
    os.chmod(path, 0)
    with refused("m.safetensors", "permission denied"):
        clipforge.load(path)


@pytest.mark.parametrize("repo", ["a\nb", "x" * 500, "bad id!!", "org/../../etc", "a/b/c"])
def test_bad_hub_ids_are_refused_before_any_network(repo, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", None)  # calling it would be a TypeError
    with refused("hf-hub:", "is not a Hugging Face repository id"):
        clipforge.load("hf-hub:" + repo)


def test_refused_pickles_and_unknown_formats_are_one_sentence(micro, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    with refused("evil.pt", "holds Python objects"):
        clipforge.load(tmp_path / "evil.pt")
    with refused("'yaml'"):
        clipforge.save(micro, tmp_path / "m", format="yaml")
