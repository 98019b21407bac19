"""Training configuration: a TOML or JSON file plus ``--key value`` overrides, validated before any work.

Every problem names the field and the fix (``ConfigError``). Nested keys use dots on the command
line: ``--data.path train.csv --lr 1e-3``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    model: str = "ViT-Tiny-32"  # architecture name or JSON config file
    init_from: str | None = None  # any source clipforge.load reads (fine-tuning), ARCH/TAG included
    init_model: str | None = None  # architecture of a plain-state-dict init_from: a name, JSON file or "openai"
    init_quick_gelu: bool | None = None  # activation of a plain-state-dict init_from (it is not recorded)
    data: dict[str, Any] = field(default_factory=lambda: {"type": "synthetic"})
    output_dir: str = "runs/clipforge"
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimiser steps
    global_batch_size: int = 128
    micro_batch_size: int | None = None  # gradient caching: embed this many at a time, same gradients
    loss_chunk_size: int | None = None  # rows of the similarity matrix materialised at once
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    decay_embeddings: bool = False  # decay embeddings and the temperature too (the paper does not)
    beta1: float = 0.9
    beta2: float | None = None  # default 0.98 for ViT, 0.999 for ResNet (the paper)
    eps: float | None = None  # default 1e-6 for ViT, 1e-8 for ResNet
    grad_clip_norm: float | None = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    lock_image: bool = False
    lock_text: bool = False
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    save_every_steps: int = 100
    keep_last: int = 3
    log_every_steps: int = 10
    eval_every_steps: int | None = None
    # evaluation hooks: "synthetic_retrieval", "zero_shot:cifar10=/data/cifar10,max_samples=2000",
    # "retrieval:flickr8k=/data/flickr8k/captions.tsv" (';'-separated on the command line)
    eval: list = field(default_factory=list)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    resume: str | None = "auto"  # auto (latest checkpoint in output_dir if any), latest, a path, or none
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _fail(name: str, message: str) -> ConfigError:
    return ConfigError(f"training config field '{name}' {message}")


def _coerce(name: str, value: Any) -> Any:
    """Turn command-line strings into the field's type; check types of file values."""
    default = getattr(TrainConfig(), name)
    annotation = str(_FIELDS[name].type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in annotation:
            return None
        raise _fail(name, "cannot be empty")
    kind = type(default) if default is not None else (bool if annotation.startswith("bool") else int if "int" in
                                                       annotation else float if "float" in annotation else str)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        raise _fail(name, f"must be true or false, got {value!r}")
    if kind in (int, float):
        try:
            number = kind(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and isinstance(value, float) and value != int(value)):
            raise _fail(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        return number
    if kind is list:
        if not isinstance(value, str):
            return list(value)
        # eval specs contain commas ("zero_shot:cifar10=/data,max_samples=500"): entries split on ';'
        return [v.strip() for v in value.split(";" if name == "eval" else ",") if v.strip()]
    if kind is dict:
        if not isinstance(value, dict):
            raise _fail(name, "must be a table/object, e.g. data = {type = \"csv\", path = \"train.csv\"}")
        return dict(value)
    return str(value)


def _validate(config: TrainConfig) -> TrainConfig:
    positive = ("epochs", "global_batch_size", "save_every_steps", "keep_last", "log_every_steps", "max_bad_steps")
    for name in positive + ("max_steps", "micro_batch_size", "loss_chunk_size", "eval_every_steps"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise _fail(name, f"must be positive, got {value}")
    for name in ("lr", "eps", "grad_clip_norm"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise _fail(name, f"must be positive, got {value}")
    if config.min_lr < 0 or config.min_lr > config.lr:
        raise _fail("min_lr", f"must be between 0 and lr ({config.lr}), got {config.min_lr}")
    if config.warmup_steps < 0:
        raise _fail("warmup_steps", f"must be >= 0, got {config.warmup_steps}")
    if config.weight_decay < 0:
        raise _fail("weight_decay", f"must be >= 0, got {config.weight_decay}")
    for name in ("beta1", "beta2"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < 1:
            raise _fail(name, f"must be in [0, 1), got {value}")
    if config.precision not in PRECISIONS:
        raise _fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise _fail("device", f"must be auto, cpu or cuda, got {config.device!r}")
    if config.lock_image and config.lock_text:
        raise _fail("lock_text", "cannot be true together with lock_image: nothing would train")
    if config.eval and config.eval_every_steps is None:
        config.eval_every_steps = config.save_every_steps
    if "type" not in config.data:
        raise _fail("data.type", "is required: csv, webdataset or synthetic")
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


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file (TOML or JSON), then overrides; nested data keys as 'data.path'."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config file '{path}' does not exist; check the path")
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"training config file '{path}' cannot be parsed ({error}); fix its syntax") from None
    values = dict(values)
    values["data"] = dict(values.get("data", {"type": "synthetic"}))
    for key, value in (overrides or {}).items():
        if key.startswith("data."):
            values["data"][key[5:]] = _parse_scalar(value)
        else:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise _fail(unknown[0], f"is not a known field; known fields are: {', '.join(_FIELDS)}")
    return _validate(TrainConfig(**{name: _coerce(name, value) for name, value in values.items()}))
