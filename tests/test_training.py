"""Training: config validation, the paper's optimiser rules, exact resume, exact DDP, bad data, and that it learns."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import clipforge
from clipforge.errors import ConfigError
from clipforge.training import load_train_config
from clipforge.training.checkpointing import latest_checkpoint, list_checkpoints
from clipforge.training.optim import cosine_with_warmup, parameter_groups

PYTHON = sys.executable
TINY_RUN = {"model": "ViT-Tiny-32", "global_batch_size": 16, "warmup_steps": 2, "lr": 1e-3, "log_every_steps": 1,
            "tensorboard": False, "progress": False, "data.num_samples": 256, "data.num_workers": 0}


def _config(tmp_path, **changes):
    return load_train_config(None, {**TINY_RUN, "output_dir": str(tmp_path / "run"), **changes})


def _cli(args: dict, env=None) -> list[str]:
    command = [PYTHON, "-m", "clipforge", "train"]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    return command


def _final_weights(output_dir) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(output_dir), weights_only=True)["model"]


@pytest.mark.parametrize("overrides, field", [
    ({"lr": "-1"}, "lr"), ({"precision": "fp8"}, "precision"), ({"global_batch_sise": "8"}, "global_batch_sise"),
    ({"epochs": "two"}, "epochs"), ({"lock_image": "true", "lock_text": "true"}, "lock_text"),
])
def test_bad_config_names_the_field_before_any_work(overrides, field, tmp_path):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_train_config(None, overrides)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('model = "RN-Tiny-64"\nlr = 1e-3\n[data]\ntype = "csv"\npath = "x.csv"\n')
    config = load_train_config(path, {"lr": "2e-3", "data.num_workers": "4"})
    assert (config.model, config.lr, config.data) == ("RN-Tiny-64", 2e-3, {"type": "csv", "path": "x.csv",
                                                                           "num_workers": 4})


def test_weight_decay_spares_gains_biases_embeddings_and_temperature():
    model = clipforge.create_model("ViT-Tiny-32")
    decay, no_decay = parameter_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed and "visual.proj" in decayed
    assert not any(n.endswith("bias") or "ln_" in n or "embedding" in n or n == "logit_scale" for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cosine_schedule_with_linear_warmup():
    lrs = [cosine_with_warmup(s, base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert min(lrs) >= 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_synthetic_run_learns(tmp_path):
    """A small CLIP trained under a minute retrieves held-out synthetic captions far above chance."""
    from clipforge.training import train

    config = _config(tmp_path, max_steps=120, global_batch_size=64, lr=2e-3, warmup_steps=10, log_every_steps=20,
                     save_every_steps=1000, **{"data.num_samples": 64 * 120})
    start = time.perf_counter()
    summary = train(config)
    assert time.perf_counter() - start < 90
    from clipforge.training.hooks import synthetic_retrieval

    model, _ = clipforge.load(summary["checkpoint"])
    metrics = synthetic_retrieval(model=model, device=torch.device("cpu"), seed=0, count=256)(model)
    chance = 1 / 256
    assert metrics["eval/synthetic_image_to_text_R@1"] > 10 * chance, metrics
    assert (tmp_path / "run" / "training_curves.png").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL mid-epoch, rerun the same command: the weights equal an uninterrupted run's."""
    base = {**TINY_RUN, "max_steps": 12, "save_every_steps": 3, "keep_last": 2, "seed": 3}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = {**base, "output_dir": tmp_path / "reference"}
    subprocess.run(_cli(reference), check=True, env=env, capture_output=True)

    interrupted = {**base, "output_dir": tmp_path / "interrupted"}
    process = subprocess.Popen(_cli(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any("step_00000006" in p.name for p in list_checkpoints(tmp_path / "interrupted")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "interrupted")]
    assert steps and max(steps) < 12, "the run finished before it could be killed"
    subprocess.run(_cli(interrupted), check=True, env=env, capture_output=True)  # the same command again

    expected, actual = _final_weights(tmp_path / "reference"), _final_weights(tmp_path / "interrupted")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    assert len(list_checkpoints(tmp_path / "interrupted")) == 2  # keep_last


def test_two_gloo_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes trains the same parameters as 1 process on the same global batch."""
    base = {**TINY_RUN, "max_steps": 4, "save_every_steps": 4, "seed": 5, "micro_batch_size": 4}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli({**base, "output_dir": tmp_path / "one"}), check=True, env=env, capture_output=True)
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m",
                "clipforge"] + _cli({**base, "output_dir": tmp_path / "two"})[3:]
    result = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    torch.manual_seed(5)
    initial = clipforge.create_model("ViT-Tiny-32").state_dict()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    assert moved > 1e-3  # 4 AdamW steps at lr 1e-3 move weights far beyond the tolerance below
    for key in one:
        # Only the order of the gradient sums differs (all-reduce); Adam's normalisation can turn
        # ~1e-7 gradient differences on near-zero gradients into ~1e-5 weight differences.
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=5e-5)


def test_non_finite_losses_skip_then_stop(tmp_path, monkeypatch):
    import clipforge.training.loop as loop

    from clipforge.training import train

    def nan_step(*args, **kwargs):
        return {"loss": torch.tensor(float("nan"))}

    monkeypatch.setattr(loop, "training_step", lambda objective: nan_step)
    with pytest.warns(UserWarning, match="skipped this update"):
        with pytest.raises(loop.TrainingStopped, match="3 non-finite losses in a row"):
            train(_config(tmp_path, max_steps=10, max_bad_steps=3))


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    from PIL import Image

    from clipforge.training import train

    rows = ["filepath\ttitle"]
    for i in range(40):
        Image.new("RGB", (40, 40), (i * 6, 0, 255 - i * 6)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta picture number {i}")
    (tmp_path / "3.png").write_bytes(b"broken")
    rows[6] = "5.png\t   "  # an empty caption
    rows.append("missing.png\ta caption")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    summary = train(_config(tmp_path, epochs=2, **{"data.type": "csv", "data.path": str(tmp_path / "train.tsv"),
                                                  "global_batch_size": 20}))
    assert summary["steps"] == 2  # 39 usable rows // 20 = 1 step per epoch: bad rows are dropped, never repeated
    # Each bad row counted once per epoch, by reason, and named in skipped.tsv.
    assert summary["skipped_samples"] == {"unreadable_image": 2, "empty_caption": 2, "missing_file": 2}
    from clipforge.data.skips import read_skipped_tsv

    named = read_skipped_tsv(tmp_path / "run" / "skipped.tsv")
    assert sorted(reason for _, reason, _ in named) == ["empty_caption", "missing_file", "unreadable_image"]


def test_cli_train_then_resume_latest(tmp_path):
    args = {**TINY_RUN, "max_steps": 2, "output_dir": tmp_path / "run"}
    subprocess.run(_cli(args), check=True, capture_output=True)
    result = subprocess.run(_cli({**args, "max_steps": 4, "resume": "latest"}), capture_output=True, text=True)
    assert result.returncode == 0 and "resumed from" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "train/loss" in row] == [1, 2, 3, 4]
    bad = subprocess.run(_cli({**args, "output_dir": tmp_path / "empty", "resume": "latest"}), capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_a_locked_tower(tmp_path, precision):
    """Mixed precision, gradient checkpointing and gradient caching together; a locked tower never moves."""
    from clipforge.training import train

    config = _config(tmp_path, max_steps=2, precision=precision, lock_text="true", grad_checkpointing="true",
                     micro_batch_size=8)
    summary = train(config)
    assert math.isfinite(summary["final_loss"]) and summary["nonfinite_steps"] == 0
    torch.manual_seed(config.seed)
    initial = clipforge.create_model("ViT-Tiny-32").state_dict()
    final = _final_weights(tmp_path / "run")
    assert torch.equal(final["transformer.resblocks.0.attn.in_proj_weight"],
                       initial["transformer.resblocks.0.attn.in_proj_weight"])
    assert not torch.equal(final["visual.conv1.weight"], initial["visual.conv1.weight"])
