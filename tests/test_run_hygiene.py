"""A training run a user cannot crash or lose: bad configs are one sentence, reruns resume cleanly, signals save
a checkpoint, one run per output_dir, and the run says what it did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.cli.main import main
from clipforge.errors import CheckpointError, ClipforgeError, ConfigError
from clipforge.training import load_train_config, train
from clipforge.training.checkpointing import list_checkpoints
from clipforge.training.run_files import claim_output_dir

PYTHON = sys.executable
TINY = {"model": "ViT-Tiny-32", "global_batch_size": 16, "warmup_steps": 2, "lr": 1e-3, "log_every_steps": 1,
        "tensorboard": False, "progress": False, "data.num_samples": 256, "data.num_workers": 0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(output_dir: Path, **changes):
    return load_train_config(None, {**TINY, "output_dir": str(output_dir), **changes})


def _cli(output_dir: Path, **changes) -> list[str]:
    command = [PYTHON, "-m", "clipforge", "train"]
    for key, value in {**TINY, "output_dir": output_dir, **changes}.items():
        command += [f"--{key}", str(value)]
    return command


def _one_sentence(message: str) -> None:
    assert "\n" not in message and len(message) <= 300 and "Traceback" not in message, message


def _loss_steps(output_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "train/loss" in row]


@pytest.mark.parametrize("overrides, field", [
    ({"lr": "nan"}, "lr"), ({"lr": "inf"}, "lr"), ({"min_lr": "-inf"}, "min_lr"), ({"beta1": "nan"}, "beta1"),
    ({"weight_decay": "nan"}, "weight_decay"), ({"grad_clip_norm": "inf"}, "grad_clip_norm"), ({"lr": "0"}, "lr"),
    ({"eps": "-1e-8"}, "eps"), ({"global_batch_size": "0"}, "global_batch_size"), ({"epochs": "inf"}, "epochs"),
    ({"warmup_steps": "-1"}, "warmup_steps"), ({"threads": "0"}, "threads"), ({"threads": "two"}, "threads"),
    ({"device": "banana"}, "device"), ({"device": "cuda:x"}, "device"), ({"lrr": "1e-3"}, "lrr"),
    ({"data": "train.tsv"}, "data"), ({"output_dir": ""}, "output_dir"), ({"eval": "synthetic_retreival"}, "eval"),
])
def test_bad_override_is_one_sentence_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        load_train_config(None, overrides)
    assert f"'{field}'" in str(error.value)
    _one_sentence(str(error.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"'device' is 'cuda' but no CUDA GPU.*device = \"cpu\"") as error:
        load_train_config(None, {"device": "cuda"})
    _one_sentence(str(error.value))


@pytest.mark.parametrize("name, content, says", [
    ("list.json", b"[1, 2]", "not an object"), ("latin1.toml", b"lr = 1e-3 # caf\xe9\n", "not UTF-8"),
    ("broken.toml", b"lr = = 3\n", "not valid TOML"), ("broken.json", b"{\"lr\": }", "not valid JSON"),
    ("data.toml", b"data = \"train.tsv\"\n", "'data' must be a table"),
    ("data_list.toml", b"data = [1, 2]\n", "'data' must be a table"),
    ("eval.toml", b"eval = 5\n", "'eval' must be a list"), ("eval_table.toml", b"[eval]\nx = 1\n", "'eval' must be"),
    ("nan.toml", b"lr = nan\n", "'lr' must be a finite number"),
])
def test_bad_config_file_is_one_sentence(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as error:
        load_train_config(path)
    _one_sentence(str(error.value))


def test_cli_help_lists_every_field_and_bad_config_exits_2(tmp_path, capsys):
    from dataclasses import fields

    from clipforge.training.config import TrainConfig
    from clipforge.training.config_help import field_comments

    try:
        status = main(["train", "--help"])
    except SystemExit as stop:  # argparse's way; main() may also return the status
        status = stop.code
    assert status == 0
    shown = capsys.readouterr().out
    comments = field_comments()
    for spec in fields(TrainConfig):
        assert f"--{spec.name.replace('_', '-')} " in shown and comments[spec.name].split()[0] in shown, spec.name
    assert "(default 0.0005)" in shown and "130 / 143" in shown
    (tmp_path / "bad.toml").write_text("lr = inf\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'lr'" in err


def test_rerun_resumes_without_duplicates_or_debris_and_a_finished_run_says_so(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clipforge.checkpoints.atomic import TEMP_MARK

    run = tmp_path / "run"
    config = _config(run, max_steps=4, save_every_steps=2, tensorboard="true", progress="true", threads=1,
                     eval="synthetic_retrieval", eval_every_steps=2)
    summary = train(config)
    assert torch.get_num_threads() == 1
    out = capsys.readouterr().out
    # stdout is not a terminal here: one plain line per log step, one per evaluation, then the summary
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ") and " loss " in line] == \
        ["1/4", "2/4", "3/4", "4/4"]
    assert "step 2 eval synthetic: image->text R@1 " in out and "step 4 eval synthetic:" in out
    assert "final loss" in out and summary["checkpoint"] in out and summary["plot"] in out

    # A run killed after logging step 4 but before saving it, mid-write of another checkpoint:
    (run / "checkpoints" / "step_00000004.pt").unlink()
    stale = run / "checkpoints" / f".step_00000005.pt{TEMP_MARK}abcd1234"
    stale.write_bytes(b"half a checkpoint")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "train/lo')  # torn last line
    summary = train(_config(run, max_steps=4, save_every_steps=2, tensorboard="true"))
    out = capsys.readouterr().out
    assert "removed 1 temporary file" in out and "resumed from" in out and not stale.exists()
    # progress = false still prints one line per log step
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["3/4", "4/4"]
    assert _loss_steps(run) == [1, 2, 3, 4]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert summary["steps_this_run"] == 2

    # The same command again: nothing to do, and it says so (exit 0, no "nan").
    before = list_checkpoints(run)
    assert main([a for a in _cli(run, max_steps=4, save_every_steps=2)[3:]]) == 0
    out = capsys.readouterr().out
    assert "already finished (step 4 of 4" in out and "nan" not in out
    assert list_checkpoints(run) == before and _loss_steps(run) == [1, 2, 3, 4]

    # Starting over in the same folder would prune the new checkpoints as older ones: refused.
    with pytest.raises(CheckpointError, match="later checkpoint") as error:
        train(_config(run, max_steps=6, resume="none"))
    _one_sentence(str(error.value))


@pytest.mark.parametrize("number, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 1)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, number, workers):
    """SIGTERM (SLURM before preemption) to the main process; SIGINT (Ctrl-C) to the whole group, data workers too."""
    run = tmp_path / "run"
    process = subprocess.Popen(_cli(run, max_steps=500, save_every_steps=1000, **{"data.num_workers": workers}),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and _loss_steps(run)):
        time.sleep(0.05)
    if number == signal.SIGINT:
        os.killpg(process.pid, number)
    else:
        process.send_signal(number)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + number, err[-2000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and "rerun the same command to resume" in stopped[0], out
    step = int(stopped[0].split(" at step ")[1].split()[0])
    assert 1 <= step < 500 and [p.name for p in list_checkpoints(run)] == [f"step_{step:08d}.pt"]
    assert torch.load(list_checkpoints(run)[0], weights_only=True)["step"] == step
    assert "Traceback" not in err


def test_a_live_run_holds_output_dir_and_a_killed_one_does_not(tmp_path):
    run = tmp_path / "run"
    with claim_output_dir(run):
        with pytest.raises(ClipforgeError, match=f"in use by another training run \\(PID {os.getpid()}\\)") as error:
            train(_config(run, max_steps=1))
        _one_sentence(str(error.value))
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from clipforge.training.run_files import "
                               "claim_output_dir; lock = claim_output_dir(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(120)", str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClipforgeError, match=f"PID {holder.pid}"):
            claim_output_dir(run)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    claim_output_dir(run).release()  # the kernel dropped the dead holder's lock


def test_skipped_samples_are_named_in_skipped_tsv_and_kept_in_the_checkpoint(tmp_path, capsys):
    from PIL import Image

    rows = ["filepath\ttitle"]
    for i in range(20):
        Image.new("RGB", (40, 40), (i * 12, 0, 255 - i * 12)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta picture number {i}")
    (tmp_path / "3.png").write_bytes(b"broken")
    rows.append("missing.png\ta caption")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    summary = train(_config(run, max_steps=2, global_batch_size=8, **{"data.type": "csv",
                                                                      "data.path": str(tmp_path / "train.tsv")}))
    assert summary["skipped_samples"].get("missing_file") == 1, summary
    table = (run / "skipped.tsv").read_text()
    assert "missing.png" in table and "missing_file" in table
    state = torch.load(list_checkpoints(run)[-1], weights_only=True)
    assert state["skipped"] == summary["skipped_samples"] and "skip_state" in state
    out = capsys.readouterr().out
    assert "skipped samples: " in out and "skipped.tsv" in out


def test_a_damaged_training_checkpoint_is_refused_not_resumed(tmp_path):
    """A few KiB zeroed inside one member: the zip's CRC no longer matches, so resuming names the file."""
    import zipfile

    train(_config(tmp_path / "run", max_steps=2))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    with zipfile.ZipFile(checkpoint) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor blob
    with open(checkpoint, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
        handle.seek(info.header_offset + 30 + name_length + extra_length + 64)
        handle.write(bytes(min(4096, info.file_size - 64)))
    with pytest.raises(CheckpointError) as error:
        train(_config(tmp_path / "run", max_steps=4))
    _one_sentence(str(error.value))
    assert checkpoint.name in str(error.value) and "CRC" in str(error.value)
