"""The training loop: one path for CPU/GPU and 1/N processes, read top to bottom like nanoGPT's.

    setup (world, seed, model, optimiser, data) -> resume -> for each step:
        lr schedule -> contrastive step (gradient-cached if asked) -> skip if non-finite
        -> clip, step, clamp temperature -> log -> checkpoint -> evaluate
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from clipforge.checkpoints import load as load_checkpoint_model
from clipforge.data import DataConfig, build_train_data
from clipforge.errors import ClipforgeError
from clipforge.models import CLIP, create_model
from clipforge.models.clip import MAX_LOGIT_SCALE
from clipforge.training import checkpointing as ckpt
from clipforge.training.config import TrainConfig
from clipforge.training.distributed import World, all_reduce_mean, cleanup, init_distributed, pick_device, world_from_env
from clipforge.training.grad_cache import contrastive_step
from clipforge.training.hooks import build_eval_hooks
from clipforge.training.metrics import MetricsLogger, plot_training_curves
from clipforge.training.optim import cosine_with_warmup, make_optimizer, paper_betas_eps, set_lr


class TrainingStopped(ClipforgeError):
    """The run cannot go on (for example too many non-finite losses in a row)."""


def build_model(config: TrainConfig, device: torch.device) -> CLIP:
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    if config.init_from:
        model = load_checkpoint_model(config.init_from, model=config.init_model, quick_gelu=config.init_quick_gelu)[0]
    else:
        model = create_model(config.model)
    model = model.float().train()
    if config.lock_image:
        model.visual.requires_grad_(False)
    if config.lock_text:
        for part in (model.token_embedding, model.transformer, model.ln_final):
            part.requires_grad_(False)
        model.positional_embedding.requires_grad_(False)
        if model.text_projection is not None:
            model.text_projection.requires_grad_(False)
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model.to(device)


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _training_state(model: CLIP, optimizer, scaler, config: TrainConfig, counters: dict[str, Any]) -> dict[str, Any]:
    return {"config": model.config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "train_config": config.to_dict(), "rng": ckpt.rng_state(), **counters}


def _sum_across_ranks(counts: dict[str, int], world: World) -> dict[str, int]:
    if not world.distributed:
        return dict(counts)
    gathered: list[dict[str, int]] = [{} for _ in range(world.world_size)]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict. Raises ClipforgeError on bad input."""
    world = world_from_env()
    device = pick_device(config.device, world)
    init_distributed(world, device)
    try:
        return _train(config, world, device)
    finally:
        cleanup(world)


def _train(config: TrainConfig, world: World, device: torch.device) -> dict[str, Any]:
    output_dir = Path(config.output_dir)
    data_config = DataConfig.from_dict(config.data)
    model = build_model(config, device)
    betas, eps = paper_betas_eps(model.config.vision.is_resnet, config.beta1, config.beta2, config.eps)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, betas, eps, config.decay_embeddings)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    data = build_train_data(data_config, image_size=model.image_size, context_length=model.context_length,
                            global_batch_size=config.global_batch_size, rank=world.rank,
                            world_size=world.world_size, seed=config.seed)
    total_steps = config.epochs * data.steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if total_steps == 0:
        raise ClipforgeError(f"the data has fewer samples than one global batch ({config.global_batch_size}); "
                             "lower global_batch_size or add data")

    counters: dict[str, Any] = {"step": 0, "epoch": 0, "step_in_epoch": 0, "skipped": {}, "bad_steps": 0,
                                "nonfinite_steps": 0}
    resume_from = ckpt.resolve_resume(config.resume, output_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        counters = {key: state[key] for key in counters}
    wrapped = model
    if world.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = _autocast(config.precision, device)
    hooks = build_eval_hooks(config.eval, model=model, device=device, seed=config.seed) if world.is_main else []
    logger = MetricsLogger(output_dir, world.is_main, tensorboard=config.tensorboard,
                           wandb_project=config.wandb_project, config=config.to_dict())
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            print(f"resumed from {resume_from} at step {counters['step']}")
    bar = tqdm(total=total_steps, initial=counters["step"], disable=not (config.progress and world.is_main),
               dynamic_ncols=True, desc="train")
    window_start, window_samples = time.perf_counter(), 0
    skipped_since_log: dict[str, int] = {}
    loss = torch.tensor(float("nan"))
    try:
        while counters["step"] < total_steps:
            for batch in data.batches(counters["epoch"], counters["step_in_epoch"]):
                step = counters["step"]
                lr = cosine_with_warmup(step, base_lr=config.lr, min_lr=config.min_lr,
                                        warmup_steps=config.warmup_steps, total_steps=total_steps)
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                result = contrastive_step(
                    wrapped, batch.images.to(device, non_blocking=True), batch.texts.to(device, non_blocking=True),
                    micro_batch=config.micro_batch_size, chunk_size=config.loss_chunk_size, autocast=autocast,
                    scaler=scaler)
                loss = all_reduce_mean(result["loss"].detach().float().reshape(1).to(device), world)[0]
                if math.isfinite(loss.item()):
                    counters["bad_steps"] = 0
                    scaler.unscale_(optimizer)
                    if config.grad_clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    with torch.no_grad():  # the paper clips the temperature at 100
                        model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
                else:
                    counters["bad_steps"] += 1
                    counters["nonfinite_steps"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    if scaler.is_enabled():
                        scaler.update(scaler.get_scale() / 2)
                    warnings.warn(f"step {step}: loss is {loss.item()}; skipped this update "
                                  f"({counters['bad_steps']} in a row)")
                    if counters["bad_steps"] >= config.max_bad_steps:
                        raise TrainingStopped(
                            f"{counters['bad_steps']} non-finite losses in a row at step {step}; lower lr, use "
                            "bf16 instead of fp16, set grad_clip_norm, or check the data")
                for reason, count in batch.skipped.items():
                    skipped_since_log[reason] = skipped_since_log.get(reason, 0) + count
                counters["step"] += 1
                counters["step_in_epoch"] += 1
                if counters["step_in_epoch"] >= data.steps_per_epoch:
                    counters["epoch"] += 1
                    counters["step_in_epoch"] = 0
                window_samples += config.global_batch_size
                done = counters["step"]
                if done % config.log_every_steps == 0 or done == total_steps:
                    new_skips = _sum_across_ranks(skipped_since_log, world)
                    for reason, count in new_skips.items():
                        counters["skipped"][reason] = counters["skipped"].get(reason, 0) + count
                    skipped_since_log = {}
                    rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                    window_start, window_samples = time.perf_counter(), 0
                    values = {"train/loss": loss.item(), "train/lr": lr,
                              "train/logit_scale": model.logit_scale_value().item(), "train/samples_per_s": rate,
                              "train/epoch": done / data.steps_per_epoch,
                              "data/skipped_total": float(sum(counters["skipped"].values()))}
                    logger.log(done, values)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{lr:.2e}",
                                    temp=f"{values['train/logit_scale']:.2f}", sps=f"{rate:.0f}")
                bar.update(1)
                if hooks and config.eval_every_steps and (done % config.eval_every_steps == 0 or done == total_steps):
                    model.eval()
                    for hook in hooks:
                        logger.log(done, hook(model))
                    model.train()
                if done % config.save_every_steps == 0 or done == total_steps:
                    if world.is_main:
                        ckpt.save_checkpoint(_training_state(model, optimizer, scaler, config, counters),
                                             output_dir, done, config.keep_last)
                    if world.distributed:
                        dist.barrier()
                if done >= total_steps:
                    break
    finally:
        bar.close()
        logger.close()
    summary = {"steps": counters["step"], "final_loss": loss.item(),
               "skipped_samples": counters["skipped"], "nonfinite_steps": counters["nonfinite_steps"],
               "checkpoint": str(ckpt.latest_checkpoint(output_dir)) if world.is_main else None}
    if world.is_main:
        plot = plot_training_curves(logger.path, output_dir / "training_curves.png")
        summary["plot"] = str(plot) if plot else None
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(counters["skipped"].items())) or "none"
        print(f"done: {counters['step']} steps, final loss {summary['final_loss']:.4f}, skipped samples: {skipped}, "
              f"non-finite steps: {counters['nonfinite_steps']}; checkpoint {summary['checkpoint']}")
    return summary
