"""Training configuration: a TOML or JSON file plus ``--key value`` overrides, validated before any work.

Every problem is one sentence that names the field and the fix (``ConfigError``): a run that
fails an hour in on a typo, a NaN learning rate or a missing GPU has wasted that hour. Nested
keys use dots on the command line: ``--data.path train.csv --lr 1e-3``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import reprlib
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
OBJECTIVES = ("contrastive", "bow_prediction", "caption_lm")  # Section 2.3, Figure 2
STATE_DTYPES = ("fp32", "bf16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    model: str = "ViT-Tiny-32"  # architecture name or JSON config file
    init_from: str | None = None  # any source clipforge.load reads (fine-tuning), ARCH/TAG included
    init_model: str | None = None  # architecture of a plain-state-dict init_from: a name, JSON file or "openai"
    init_quick_gelu: bool | None = None  # activation of a plain-state-dict init_from (it is not recorded)
    # training pairs, a table: type (csv, webdataset, synthetic), path, num_workers, image_root, split, ...
    # (every key: clipforge.data.DataConfig); on the command line --data.type csv --data.path train.tsv
    data: dict[str, Any] = field(default_factory=lambda: {"type": "synthetic"})
    output_dir: str = "runs/clipforge"  # checkpoints, metrics.jsonl, tensorboard/, plots; one live run at a time
    epochs: int = 1  # passes over the data
    max_steps: int | None = None  # stop early after this many optimiser steps
    global_batch_size: int = 128  # pairs per optimiser step, over all processes
    micro_batch_size: int | None = None  # gradient caching: embed this many at a time, same gradients
    loss_chunk_size: int | None = None  # rows of the similarity matrix materialised at once
    lr: float = 5e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.2  # AdamW decoupled decay, on weight matrices only
    decay_embeddings: bool = False  # decay embeddings and the temperature too (the paper does not)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float | None = None  # default 0.98 for ViT, 0.999 for ResNet (the paper)
    eps: float | None = None  # default 1e-6 for ViT, 1e-8 for ResNet
    grad_clip_norm: float | None = None  # clip the global gradient norm to this (none: no clipping)
    precision: str = "fp32"  # fp32, bf16 or fp16 (fp16 with loss scaling)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    lock_image: bool = False  # freeze the image tower
    lock_text: bool = False  # freeze the text tower
    objective: str = "contrastive"  # or the paper's baselines: "bow_prediction", "caption_lm" (Section 2.3)
    seed: int = 0  # initial weights, data order and crops
    device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:N
    threads: int | str | None = None  # CPU threads: N, "auto" (cores others leave free) or default (clipforge.threads)
    save_every_steps: int = 100  # checkpoint period (also at the end, and on SIGINT/SIGTERM)
    keep_last: int = 3  # checkpoints kept in output_dir/checkpoints
    log_every_steps: int = 10  # period of the progress line, metrics.jsonl and TensorBoard
    eval_every_steps: int | None = None  # period of the evaluation hooks (default: save_every_steps)
    # evaluation hooks: "synthetic_retrieval", "zero_shot:cifar10=/data/cifar10,max_samples=2000",
    # "retrieval:flickr8k=/data/flickr8k/captions.tsv" (';'-separated on the command line)
    eval: list = field(default_factory=list)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    resume: str | None = "auto"  # auto (latest checkpoint in output_dir if any), latest, a path, or none
    tensorboard: bool = True  # write output_dir/tensorboard
    wandb_project: str | None = None  # log to this Weights & Biases project (needs wandb installed)
    progress: bool = True  # a progress bar on a terminal (otherwise, and when false, one line per log step)
    strategy: str = "ddp"  # several processes: ddp (replicated weights) or fsdp (FSDP2: sharded weights/grads/state)
    fsdp_reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (less memory, more traffic)
    compile: bool = False  # torch.compile the model for the training step (falls back to eager with a warning)
    optimizer_state_dtype: str = "fp32"  # Adam moments in fp32 or bf16 (the paper's half-precision Adam statistics)
    text_weights_dtype: str = "fp32"  # text tower stored in fp32 or bf16 (updated with stochastic rounding)
    remote_sync: str | None = None  # fsspec URL (s3://, gs://, file://...): checkpoints and run files copied there

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_show = _repr.repr  # a long value keeps its message one short line


def _fail(name: str, message: str) -> ConfigError:
    return ConfigError(f"training config field '{name}' {message}")


def _example(name: str) -> str:
    """'; e.g. lr = 0.0005' from the field's default, so the fix is written out in the message."""
    default = getattr(TrainConfig(), name)
    return f"; e.g. {name} = {json.dumps(default)}" if default is not None else "; remove it to use the default"


def _kind(name: str) -> type:
    """The field's value type (bool, int, float, str, list or dict), from its default or annotation."""
    default = getattr(TrainConfig(), name)
    if default is not None:
        return type(default)
    annotation = str(_FIELDS[name].type)
    return bool if annotation.startswith("bool") else int if "int" in annotation else \
        float if "float" in annotation else str


def _coerce(name: str, value: Any) -> Any:
    """Turn command-line strings into the field's type; check types of file values."""
    annotation = str(_FIELDS[name].type)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if "None" in annotation:
            return None
        raise _fail(name, f"cannot be empty{_example(name)}")
    if name == "threads" and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    kind = _kind(name)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        raise _fail(name, f"must be true or false, got {_show(value)}")
    if kind in (int, float):
        try:
            number = kind(value) if not isinstance(value, (bool, list, dict)) else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or (kind is int and isinstance(value, float) and value != int(value)):
            what = 'an integer or "auto"' if name == "threads" else "an integer" if kind is int else "a number"
            raise _fail(name, f"must be {what}, got {_show(value)}")
        if kind is float and not math.isfinite(number):
            raise _fail(name, f"must be a finite number, got {value}{_example(name)}")
        return number
    if kind is list:
        if isinstance(value, str):
            # eval specs contain commas ("zero_shot:cifar10=/data,max_samples=500"): entries split on ';'
            return [v.strip() for v in value.split(";" if name == "eval" else ",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, dict)) for v in value):
            raise _fail(name, f"must be a list of hook names or specs, e.g. eval = [\"synthetic_retrieval\"], "
                              f"got {_show(value)}")
        return list(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise _fail(name, f"must be a table, e.g. [data] type = \"csv\" path = \"train.csv\" in TOML or "
                              f"--data.type csv --data.path train.csv, got {_show(value)}")
        return dict(value)
    if isinstance(value, (list, dict)):
        raise _fail(name, f"must be text, got {_show(value)}")
    return str(value)


def _check_device(device: str) -> None:
    """A missing GPU is found here, not after the data is read and the model built."""
    if not _DEVICE.fullmatch(device):
        raise _fail("device", f"must be auto, cpu, cuda or cuda:N, got {_show(device)}; e.g. device = \"cpu\"")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise _fail("device", f"is {device!r} but no CUDA GPU is visible on this machine; use device = \"cpu\", "
                              "or \"auto\" to take a GPU only when there is one")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise _fail("device", f"is {device!r} but this machine shows {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of those")


def _validate(config: TrainConfig) -> TrainConfig:
    positive = ("epochs", "global_batch_size", "save_every_steps", "keep_last", "log_every_steps", "max_bad_steps")
    for name in positive + ("max_steps", "micro_batch_size", "loss_chunk_size", "eval_every_steps", "threads"):
        value = getattr(config, name)
        if value is not None and value != "auto" and value <= 0:
            raise _fail(name, f"must be a positive integer, got {value}{_example(name)}")
    for name in ("lr", "eps", "grad_clip_norm"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise _fail(name, f"must be positive, got {value}{_example(name)}")
    if config.min_lr < 0 or config.min_lr > config.lr:
        raise _fail("min_lr", f"must be between 0 and lr ({config.lr}), got {config.min_lr}")
    if config.warmup_steps < 0:
        raise _fail("warmup_steps", f"must be >= 0, got {config.warmup_steps}{_example('warmup_steps')}")
    if config.weight_decay < 0:
        raise _fail("weight_decay", f"must be >= 0, got {config.weight_decay}{_example('weight_decay')}")
    for name in ("beta1", "beta2"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < 1:
            raise _fail(name, f"must be in [0, 1), got {value}")
    if not 0 <= config.seed < 2**63:
        raise _fail("seed", f"must be in [0, 2**63), got {config.seed}")
    if config.precision not in PRECISIONS:
        raise _fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {_show(config.precision)}")
    if config.strategy not in STRATEGIES:
        raise _fail("strategy", f"must be one of {', '.join(STRATEGIES)}, got {_show(config.strategy)}")
    if config.objective not in OBJECTIVES:
        raise _fail("objective", f"must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")
    for name in ("optimizer_state_dtype", "text_weights_dtype"):
        if getattr(config, name) not in STATE_DTYPES:
            raise _fail(name, f"must be fp32 or bf16, got {_show(getattr(config, name))}")
    if config.strategy == "fsdp" and config.text_weights_dtype == "bf16":
        raise _fail("text_weights_dtype", "bf16 cannot be combined with strategy = \"fsdp\" (FSDP already shards the "
                                          "weights and keeps bf16 compute copies); use one of the two")
    if config.remote_sync is not None and "://" not in config.remote_sync:
        raise _fail("remote_sync", f"must be a URL such as \"s3://bucket/runs/my-run\" or \"file:///mnt/backup/run\", "
                                   f"got {_show(config.remote_sync)}")
    if not config.output_dir.strip():
        raise _fail("output_dir", "cannot be empty; give a folder such as output_dir = \"runs/my-run\"")
    _check_device(config.device)
    if config.lock_image and config.lock_text:
        raise _fail("lock_text", "cannot be true together with lock_image: nothing would train")
    if config.eval and config.eval_every_steps is None:
        config.eval_every_steps = config.save_every_steps
    if "type" not in config.data:
        raise _fail("data.type", "is required: csv, webdataset or synthetic")
    from clipforge.data import DataConfig  # the data table's and eval entries' own checks, before any work too
    from clipforge.training.hooks import check_eval_entries

    DataConfig.from_dict(config.data)
    check_eval_entries(config.eval)
    return config


def _parse_scalar(value: Any) -> Any:
    """Command-line strings for data.* keys: numbers become numbers, the rest stays text."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _read_file(path: Path) -> dict[str, Any]:
    """The file's table; every way it can be unreadable is one sentence naming it."""
    if path.is_dir():
        raise ConfigError(f"training config file '{path}' is a folder; pass a .toml or .json file")
    if not path.is_file():
        raise ConfigError(f"training config file '{path}' does not exist; check the path")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"training config file '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} "
                          f"at offset {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"training config file '{path}' cannot be read ({error.strerror}); check its "
                          "permissions") from None
    try:
        values = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"training config file '{path}' is not valid {kind} ({error}); fix its syntax") from None
    if not isinstance(values, dict):
        raise ConfigError(f"training config file '{path}' holds a JSON {type(values).__name__}, not an object; "
                          "write {\"lr\": 0.001, \"data\": {\"type\": \"synthetic\"}, ...}")
    return values


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file (TOML or JSON), then overrides; nested data keys as 'data.path'."""
    values = dict(_read_file(Path(path))) if path is not None else {}
    if "data" in values:
        values["data"] = _coerce("data", values["data"])
    else:
        values["data"] = {"type": "synthetic"}
    for key, value in (overrides or {}).items():
        if key.startswith("data."):
            if not isinstance(values["data"], dict):
                values["data"] = _coerce("data", values["data"])
            values["data"][key[5:]] = _parse_scalar(value)
        else:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], _FIELDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise _fail(unknown[0][:60], f"is not a known field; {hint}`clipforge train --help` lists every field")
    return _validate(TrainConfig(**{name: _coerce(name, value) for name, value in values.items()}))
