"""The training loop: one path for CPU/GPU and 1/N processes, read top to bottom like nanoGPT's.

    lock output_dir, clear a killed run's debris -> setup (world, seed, model, optimiser, data)
    -> resume (or say the run is already finished) -> for each step:
        lr schedule -> contrastive step (gradient-cached if asked) -> skip if non-finite
        -> clip, step, clamp temperature -> log -> evaluate -> checkpoint -> stop if signalled
    -> summary

Exit statuses (the CLI returns ``summary["exit_status"]``): 0 finished or already finished;
130 / 143 stopped by SIGINT / SIGTERM after a checkpoint was saved (rerun to resume).
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

from clipforge.data import DataConfig, build_train_data
from clipforge.data.skips import SkipLedger, SkipRecord, count_reasons, gather_records, write_skipped_tsv
from clipforge.errors import ClipforgeError
from clipforge.models import CLIP
from clipforge.models.clip import MAX_LOGIT_SCALE
from clipforge.threads import apply_torch_threads
from clipforge.training.model_setup import build_model
from clipforge.training.objectives import training_step
from clipforge.training import checkpointing as ckpt
from clipforge.training import remote_sync, run_files
from clipforge.training.compile_step import compiled_training_step
from clipforge.training.config import TrainConfig
from clipforge.training.distributed import World, all_reduce_mean, cleanup, init_distributed, pick_device, world_from_env
from clipforge.training.hooks import build_eval_hooks
from clipforge.training.metrics import MetricsLogger, plot_training_curves, read_metrics
from clipforge.training.optim import cosine_with_warmup, make_optimizer, paper_betas_eps, set_lr
from clipforge.training.parallel import Parallel
from clipforge.training.signals import StopSignals
from clipforge.training.summary import Progress, format_eval, print_summary, say


class TrainingStopped(ClipforgeError):
    """The run cannot go on (for example too many non-finite losses in a row)."""


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _training_state(model: CLIP, weights: tuple[dict, dict], scaler, config: TrainConfig, counters: dict[str, Any],
                    skips: _Skips) -> dict[str, Any]:
    """``weights``: the model's and optimiser's plain state dicts (Parallel.weights)."""
    return {"config": model.config.to_dict(), "model": weights[0], "optimizer": weights[1],
            "scaler": scaler.state_dict(), "train_config": config.to_dict(), "rng": ckpt.rng_state(), **counters,
            "skipped": skips.counts(), "skip_state": skips.state_dict()}


def _new_counters() -> dict[str, Any]:
    # data_positions: each rank's stream position after the last step (WebDataset resumes exactly from it);
    # source_samples: good samples trained on per data source, summed over ranks
    return {"step": 0, "epoch": 0, "step_in_epoch": 0, "skipped": {}, "bad_steps": 0, "nonfinite_steps": 0,
            "data_positions": None, "source_samples": {}}


def _gather_positions(position: dict[str, Any] | None, world: World) -> list[dict[str, Any] | None]:
    """Every rank's data position (a collective), so that rank 0's checkpoint can resume each rank exactly."""
    if not world.distributed:
        return [position]
    gathered: list[dict[str, Any] | None] = [None] * world.world_size
    dist.all_gather_object(gathered, position)
    return gathered


def _my_position(counters: dict[str, Any], world: World) -> dict[str, Any] | None:
    positions = counters.get("data_positions")
    if not positions or len(positions) != world.world_size:
        return None  # none saved (map-style data, an older checkpoint) or another world size: resume by step
    return positions[world.rank]


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


# ---- Skipped samples: the ONE place they are counted, stored in the checkpoint and written to skipped.tsv. ----
class _Skips:
    """The run's bad samples. Named ones (``Batch.skips``) go to data.skips' ledger, which counts each source
    once per epoch across ranks and resumes; counts a source reports without names (``Batch.skipped`` only)
    are added as they come. ``flush`` is a collective: call it on every rank at the same step."""

    def __init__(self) -> None:
        self.ledger = SkipLedger()
        self.unnamed: dict[str, int] = {}
        self._records: list[SkipRecord] = []
        self._counts: dict[str, int] = {}

    def add(self, batch: Any) -> None:
        records = list(getattr(batch, "skips", []) or [])
        self._records += records
        named = count_reasons(records)
        for reason, count in batch.skipped.items():
            if count > named.get(reason, 0):
                self._counts[reason] = self._counts.get(reason, 0) + count - named.get(reason, 0)

    def flush(self, world: World) -> None:
        self.ledger.add(gather_records(self._records))
        for reason, count in _sum_across_ranks(self._counts, world).items():
            self.unnamed[reason] = self.unnamed.get(reason, 0) + count
        self._records, self._counts = [], {}

    def counts(self) -> dict[str, int]:
        total = dict(self.ledger.counts())
        for reason, count in self.unnamed.items():
            total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "unnamed": dict(self.unnamed)}

    def load(self, state: dict[str, Any]) -> None:
        """From a checkpoint; one written before the ledger existed keeps its counts as unnamed."""
        if "skip_state" in state:
            self.ledger.load_state_dict(state["skip_state"]["ledger"])
            self.unnamed = dict(state["skip_state"]["unnamed"])
        else:
            self.unnamed = dict(state.get("skipped", {}))

    def write(self, output_dir: Path) -> Path:
        """output_dir/skipped.tsv: source, reason and detail of every named bad sample."""
        return write_skipped_tsv(self.ledger.records(), output_dir / run_files.SKIPPED_NAME)


def _apply_update(loss: torch.Tensor, model: CLIP, optimizer, scaler, config: TrainConfig,
                  counters: dict[str, Any], step: int) -> None:
    """Step on a finite loss; skip a non-finite one, and stop after max_bad_steps of them in a row."""
    if math.isfinite(loss.item()):
        counters["bad_steps"] = 0
        scaler.unscale_(optimizer)
        if config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():  # the paper clips the temperature at 100
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return
    counters["bad_steps"] += 1
    counters["nonfinite_steps"] += 1
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled():
        scaler.update(scaler.get_scale() / 2)
    warnings.warn(f"step {step}: loss is {loss.item()}; skipped this update ({counters['bad_steps']} in a row)")
    if counters["bad_steps"] >= config.max_bad_steps:
        raise TrainingStopped(f"{counters['bad_steps']} non-finite losses in a row at step {step}; lower lr, use "
                              "bf16 instead of fp16, set grad_clip_norm, or check the data")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict. Raises ClipforgeError on bad input."""
    apply_torch_threads(config.threads)  # default: one per free physical core, shared among local ranks
    world = world_from_env()
    device = pick_device(config.device, world)
    init_distributed(world, device)
    try:
        output_dir = Path(config.output_dir)
        lock = run_files.claim_output_dir(output_dir) if world.is_main else None
        try:
            if world.is_main and (removed := run_files.remove_stale_temp_files(output_dir)):
                say(f"removed {len(removed)} temporary file(s) an interrupted save left in {output_dir}")
            return _train(config, world, device, output_dir)
        finally:
            if lock is not None:
                lock.release()
    finally:
        cleanup(world)


def _already_finished(counters: dict[str, Any], total_steps: int, checkpoint: Path | None,
                      output_dir: Path, world: World) -> dict[str, Any]:
    """A rerun of a finished run trains nothing and says so (exit status 0)."""
    losses = [row["train/loss"] for row in read_metrics(output_dir / "metrics.jsonl") if "train/loss" in row]
    plot = output_dir / "training_curves.png"
    summary = {"steps": counters["step"], "steps_this_run": 0, "already_finished": True,
               "final_loss": losses[-1] if losses else None, "skipped_samples": counters["skipped"],
               "nonfinite_steps": counters["nonfinite_steps"], "checkpoint": str(checkpoint),
               "plot": str(plot) if plot.is_file() else None, "stopped_by": None, "exit_status": 0}
    if world.is_main:
        loss = f", final loss {losses[-1]:.4f}" if losses else ""
        say(f"the run in '{output_dir}' is already finished (step {counters['step']} of {total_steps}{loss}, "
            f"checkpoint {checkpoint}); raise max_steps or epochs to train further, or choose another output_dir")
    return summary


def _train(config: TrainConfig, world: World, device: torch.device, output_dir: Path) -> dict[str, Any]:
    data_config = DataConfig.from_dict(config.data)
    model = build_model(config, device)
    parallel = Parallel(config, world, device)
    # compile = true: each block compiled in place before it is sharded or wrapped; eager again if that fails
    train_step = compiled_training_step(training_step(config.objective), model, config.compile)
    parallel.shard(model)  # FSDP2 shards in place, before the optimiser sees the parameters
    betas, eps = paper_betas_eps(model.config.vision.is_resnet, config.beta1, config.beta2, config.eps)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, betas, eps, config.decay_embeddings,
                               state_dtype=config.optimizer_state_dtype, seed=config.seed)
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

    counters, skips = _new_counters(), _Skips()
    resume_from = remote_sync.resolve_resume(config, output_dir, world)  # fetches a newer remote copy first
    if resume_from is not None:
        state = parallel.resume(resume_from, model, optimizer, scaler)  # FSDP: from step_N.dcp when there
        counters = {key: state.get(key, value) for key, value in counters.items()}
        skips.load(state)
    ckpt.refuse_later_checkpoints(output_dir, counters["step"])
    if counters["step"] >= total_steps:
        return _already_finished(counters, total_steps, resume_from, output_dir, world)
    remote = remote_sync.RemoteSync.for_run(config, output_dir, world, counters["step"])
    if world.is_main:
        dropped = run_files.truncate_metrics(output_dir / "metrics.jsonl", counters["step"])
        if resume_from is not None:
            after = f"; dropped {dropped} metrics.jsonl row(s) logged after it" if dropped else ""
            say(f"resumed from {resume_from} at step {counters['step']}{after}")
    wrapped = parallel.wrap(model)  # DDP, or the FSDP2-sharded model itself
    autocast = _autocast(parallel.autocast_precision, device)
    hooks = build_eval_hooks(config.eval, model=model, device=device, seed=config.seed) if world.is_main else []
    logger = MetricsLogger(output_dir, world.is_main, tensorboard=config.tensorboard,
                           wandb_project=config.wandb_project, config=config.to_dict(), resumed_step=counters["step"])
    progress = Progress(total_steps, counters["step"], enabled=world.is_main, bar=config.progress)
    started, first_step = time.perf_counter(), counters["step"]
    window_start, window_samples = time.perf_counter(), 0
    last_loss: float | None = None
    last_eval: tuple[int, list[dict[str, float]]] | None = None
    saved_at = counters["step"] if resume_from is not None else -1

    position = _my_position(counters, world)  # this rank's data stream after the last step taken
    source_samples: dict[str, int] = {}  # good samples per source since the last log step, this rank

    def save(done: int) -> None:
        nonlocal saved_at
        skips.flush(world)
        counters["data_positions"] = _gather_positions(position, world)
        weights = parallel.weights(model, optimizer)  # FSDP: gathered to rank 0 (a collective)
        if world.is_main:
            skips.write(output_dir)
            ckpt.save_checkpoint(_training_state(model, weights, scaler, config, counters, skips), output_dir,
                                 done, config.keep_last, sharded=parallel.fsdp)
        parallel.save_shards(model, optimizer, output_dir, done)  # FSDP: step_N.dcp too
        if world.distributed:
            dist.barrier()
        remote.upload(done)  # rank 0, in the background
        saved_at = done

    stop = StopSignals()
    try:
        with stop:
            stopping = False
            while counters["step"] < total_steps and not stopping:
                batches = iter(data.batches(counters["epoch"], counters["step_in_epoch"], position))
                while counters["step"] < total_steps:
                    step = counters["step"]
                    lr = cosine_with_warmup(step, base_lr=config.lr, min_lr=config.min_lr,
                                            warmup_steps=config.warmup_steps, total_steps=total_steps)
                    try:
                        batch = next(batches)
                        set_lr(optimizer, lr)
                        optimizer.zero_grad(set_to_none=True)
                        size = batch.images.shape[0]  # smaller when bad samples were dropped; 0: all were
                        result = train_step(  # the objective's step, through the compiled blocks if compile = true
                            wrapped, batch.images.to(device, non_blocking=True),
                            batch.texts.to(device, non_blocking=True), micro_batch=config.micro_batch_size,
                            chunk_size=config.loss_chunk_size, autocast=autocast, scaler=scaler) if size else None
                    except StopIteration:
                        break
                    except Exception:
                        if stop.received is None:
                            raise
                        # The signal also reached the data workers and one failed; nothing was updated yet,
                        # so the run still stands at the step boundary and can be saved there.
                        stopping = True
                        break
                    if result is not None:  # ranks agree on the size, so all skip an empty step together
                        loss = all_reduce_mean(result["loss"].detach().float().reshape(1).to(device), world)[0]
                        _apply_update(loss, model, optimizer, scaler, config, counters, step)
                        last_loss = loss.item()
                    skips.add(batch)
                    position = batch.position
                    for name, count in batch.source_counts.items():
                        source_samples[name] = source_samples.get(name, 0) + count
                    counters["step"] += 1
                    counters["step_in_epoch"] += 1
                    if counters["step_in_epoch"] >= data.steps_per_epoch:
                        counters["epoch"] += 1
                        counters["step_in_epoch"] = 0
                    window_samples += size * world.world_size
                    done = counters["step"]
                    if done % config.log_every_steps == 0 or done == total_steps:
                        skips.flush(world)
                        counters["skipped"] = skips.counts()
                        rate = window_samples / max(1e-9, time.perf_counter() - window_start)
                        window_start, window_samples = time.perf_counter(), 0
                        skipped_total = sum(counters["skipped"].values())
                        if source_samples:  # WebDataset sources (on every rank alike); none for CSV/synthetic
                            for name, count in _sum_across_ranks(source_samples, world).items():
                                counters["source_samples"][name] = counters["source_samples"].get(name, 0) + count
                            source_samples = {name: 0 for name in source_samples}
                        values = {"train/loss": math.nan if last_loss is None else last_loss, "train/lr": lr,
                                  "train/logit_scale": parallel.logit_scale(model), "train/samples_per_s": rate,
                                  "train/epoch": done / data.steps_per_epoch,
                                  "data/skipped_total": float(skipped_total),
                                  **{f"data/samples_{name}": float(count)
                                     for name, count in counters["source_samples"].items()},
                                  **parallel.memory_once(model, optimizer)}  # once, after the first update
                        logger.log(done, values)
                        progress.log_step(done, values, skipped_total)
                    progress.advance()
                    if config.eval and config.eval_every_steps and (done % config.eval_every_steps == 0
                                                                    or done == total_steps):
                        last_eval = (done, parallel.evaluate(hooks, model))  # FSDP: every rank gathers
                        for values in last_eval[1]:
                            logger.log(done, values)
                            progress.write(f"step {done} eval {format_eval(values)}")
                    if done % config.save_every_steps == 0 or done == total_steps:
                        save(done)
                    if stop.agreed(world, device):
                        stopping = True
                        break
            if stop.received is not None and saved_at != counters["step"]:
                save(counters["step"])
    finally:
        progress.close()
        logger.close()
    counters["skipped"] = skips.counts()
    summary = {"steps": counters["step"], "steps_this_run": counters["step"] - first_step, "final_loss": last_loss,
               "skipped_samples": counters["skipped"], "nonfinite_steps": counters["nonfinite_steps"],
               "source_samples": dict(counters["source_samples"]),
               "checkpoint": str(ckpt.latest_checkpoint(output_dir)) if world.is_main else None,
               "skipped_file": str(output_dir / run_files.SKIPPED_NAME) if counters["skipped"] else None,
               "stopped_by": stop.name or None, "exit_status": stop.exit_status, "plot": None,
               **parallel.memory}  # memory/*_bytes_per_rank once measured
    if world.is_main:
        if not stop.received:  # a preempted job has seconds left: no plot then
            plot = plot_training_curves(logger.path, output_dir / "training_curves.png")
            summary["plot"] = str(plot) if plot else None
        print_summary(summary, last_eval=last_eval, elapsed=time.perf_counter() - started, metrics_path=logger.path,
                      headline="stopped" if stop.received else "done")
        if stop.received:
            how = "rerun the same command" if (config.resume or "").lower() in ("auto", "latest") else \
                "rerun with --resume latest"
            say(f"stopped by {stop.name} at step {counters['step']} of {total_steps} with checkpoint "
                f"{summary['checkpoint']}; {how} to resume")
    remote.finish()
    return summary
