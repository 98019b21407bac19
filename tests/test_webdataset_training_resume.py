"""End to end: a WebDataset run killed with SIGKILL at a random moment, rerun with the same command, ends with
exactly the weights of an uninterrupted run — with several loader workers, two ranks, uneven shards, bad
samples, and resampled weighted sources. fp32 on CPU, so "exactly" means bit for bit."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.training.checkpointing import latest_checkpoint, list_checkpoints

PYTHON = sys.executable
SHARD_SIZES = (13, 9, 17, 11, 7, 15, 10)  # uneven: workers run dry at different times, passes repeat


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_shards(folder: Path, prefix: str = "", sizes: tuple[int, ...] = SHARD_SIZES) -> str:
    """Shards with a bad image, a missing caption and an empty caption, and one truncated shard."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        with tarfile.open(folder / f"{index:05d}.tar", "w") as tar:
            for row in range(size):
                key = f"{prefix}{index:02d}_{row:03d}"
                image = b"\x89PNG broken" if (index, row) == (1, 4) else _png(index * 100 + row)
                _member(tar, f"{key}.png", image)
                if (index, row) != (2, 3):
                    caption = "   " if (index, row) == (3, 5) else f"{prefix} photo {row} of shard {index}"
                    _member(tar, f"{key}.txt", caption.encode())
    if len(sizes) > 4:
        cut = folder / "00004.tar"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 300])
    return str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")


def _command(args: dict) -> list[str]:
    command = ["-m", "clipforge", "train"]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    return command


def _run(args: dict, ranks: int, port: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [PYTHON] if ranks == 1 else [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                            "--master_port", str(port)]
    return subprocess.Popen(launcher + _command(args), env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(output_dir), weights_only=True)["model"]


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc), so SIGKILL reaches the ranks and their loader workers at once."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_and_resume(args: dict, output_dir: Path, ranks: int, port: int, total: int, rng: random.Random) -> int:
    """Start, SIGKILL the whole process group at a random moment after a random checkpoint, rerun to the end."""
    target = rng.randrange(1, total - 5)
    process = _run({**args, "output_dir": output_dir}, ranks, port)
    deadline = time.time() + 300
    def steps() -> list[int]:
        return [int(p.stem.split("_")[1]) for p in list_checkpoints(output_dir)]

    while time.time() < deadline and not any(s >= target for s in steps()) and process.poll() is None:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.15))  # anywhere inside the next step(s), workers mid-read
    for pid in [process.pid] + _descendants(process.pid):  # torchrun starts its workers in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    process.communicate()
    killed_at = max(steps(), default=0)
    assert killed_at < total, "the run finished before it could be killed"
    _finish(_run({**args, "output_dir": output_dir}, ranks, port + 1))
    return killed_at


BASE = {"model": "ViT-Tiny-32", "global_batch_size": 8, "warmup_steps": 2, "lr": 1e-3, "log_every_steps": 1,
        "tensorboard": False, "progress": False, "save_every_steps": 1, "keep_last": 2, "epochs": 3,
        "data.type": "webdataset", "data.num_samples": 64}


@pytest.mark.parametrize("ranks, workers, resampled", [(1, 3, False), (2, 2, False), (2, 2, True)])
def test_sigkilled_webdataset_run_resumes_bit_identically(tmp_path, ranks, workers, resampled):
    first = write_shards(tmp_path / "a", "a")
    args = {**BASE, "seed": 11, "data.num_workers": workers, "data.path": first}
    if resampled:
        second = write_shards(tmp_path / "b", "b", sizes=(8, 12, 9))
        args.update({"data.path": f"{first}::{second}", "data.resampled": "true",
                     "data.upsampling_factors": "1::3"})
    port = 29600 + 10 * ranks + workers + 5 * resampled
    _finish(_run({**args, "output_dir": tmp_path / "reference"}, ranks, port + 2))
    total = 3 * 64 // 8
    killed_at = _kill_and_resume(args, tmp_path / "resumed", ranks, port + 3, total, random.Random(port))
    expected, actual = _weights(tmp_path / "reference"), _weights(tmp_path / "resumed")
    assert max(int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "resumed")) == total
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs after a kill at step {killed_at}"
    reference_rows = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    resumed_rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    losses = [[row for row in rows if '"train/loss"' in row] for rows in (reference_rows, resumed_rows)]
    assert [r.split('"train/lr"')[0] for r in losses[0]] == [r.split('"train/lr"')[0] for r in losses[1]]
