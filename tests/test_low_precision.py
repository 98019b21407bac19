"""The paper's memory savers: stochastic rounding, AdamW with bf16 moments, a bf16 text tower, training with both."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clipforge
from clipforge.training import load_train_config, train
from clipforge.training.checkpointing import latest_checkpoint, list_checkpoints
from clipforge.training.low_precision import (
    CHUNK,
    LEGACY_RNG_KEY,
    LowPrecisionAdamW,
    cast_text_tower,
    rounding_seed,
    shard_start,
    stochastic_round,
    text_tower_parameters,
)
from clipforge.training.optim import make_optimizer, parameter_groups

TINY_RUN = {"model": "ViT-Tiny-32", "global_batch_size": 16, "warmup_steps": 2, "lr": 1e-3, "log_every_steps": 1,
            "tensorboard": False, "progress": False, "data.num_samples": 256, "data.num_workers": 0}
SAVERS = {"optimizer_state_dtype": "bf16", "text_weights_dtype": "bf16"}


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 bit patterns just below and above |x| (truncation, and one ulp further from zero)."""
    low = (x.view(torch.int32) >> 16).to(torch.int16)
    return low, low + 1


def _sr_values() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    magnitudes = torch.logspace(-30, 30, 400, dtype=torch.float64).float()
    return magnitudes * torch.randn(400, generator=generator).sign() * (1 + torch.rand(400, generator=generator))


def test_stochastic_rounding_is_exact_on_bf16_values():
    values = _sr_values().bfloat16()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3e38], dtype=torch.bfloat16)
    values = torch.cat([values, special])
    rounded = stochastic_round(values.float(), torch.Generator().manual_seed(0))
    assert torch.equal(rounded.view(torch.int16), values.view(torch.int16))
    assert torch.isnan(stochastic_round(torch.tensor([float("nan")]), torch.Generator())).all()


def test_stochastic_rounding_is_at_most_one_ulp_away_and_unbiased():
    """Each of N draws rounds x down (to bf16 pattern lo) or up (lo + 1), up with probability p = (dropped
    bits) / 2**16; the mean of N draws is lo_value + ulp * Binomial(N, p) / N, whose standard deviation is
    ulp * sqrt(p (1 - p) / N). Six of those over 400 values fails by chance with probability < 1e-6."""
    x = _sr_values()
    draws = 2000
    rounded = stochastic_round(x.repeat(draws), torch.Generator().manual_seed(0)).view(draws, -1)
    low, high = _neighbours(x)
    bits = rounded.view(torch.int16)
    assert ((bits == low) | (bits == high)).all()  # never more than one bf16 ulp from x
    low_value, high_value = low.view(torch.bfloat16).double(), high.view(torch.bfloat16).double()
    p = (x.double() - low_value) / (high_value - low_value)
    ulp = (high_value - low_value).abs()
    assert ((p >= 0) & (p < 1)).all()
    mean = rounded.double().mean(0)
    tolerance = 6 * ulp * (p * (1 - p) / draws).sqrt() + ulp * 1e-9
    assert ((mean - x.double()).abs() <= tolerance).all(), ((mean - x.double()).abs() / tolerance).max()
    assert (bits == high).any() and (bits == low).any()


def test_fp32_settings_keep_torchs_fused_adamw():
    model = clipforge.create_model("ViT-Tiny-32")
    optimizer = make_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    low = make_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6, state_dtype="bf16")
    assert isinstance(low, LowPrecisionAdamW) and low.state_dtype == torch.bfloat16
    assert [len(g["params"]) for g in low.param_groups] == [len(g["params"]) for g in optimizer.param_groups]
    assert [g["weight_decay"] for g in low.param_groups] == [g["weight_decay"] for g in parameter_groups(model, 0.2)]
    cast_text_tower(model, torch.bfloat16)
    mixed = make_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)  # bf16 weights: fp32 moments, rounded weights
    assert isinstance(mixed, LowPrecisionAdamW) and mixed.state_dtype == torch.float32


@pytest.mark.parametrize("fused, reference", [(True, {"fused": True}), (False, {"foreach": False})])
def test_bf16_moments_equal_torch_adamw_while_moments_are_representable(fused, reference):
    """betas of 0.5 and gradients in multiples of 1/4 keep every moment of the first 3 steps a binary
    fraction of at most 8 significant bits, so storing them in bf16 changes nothing: the updates must be
    torch's AdamW's bit for bit (the fused kernel, as fp32 training uses, or op by op where there is
    none), over a tensor of more than one CHUNK."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(-8, 8, (CHUNK // 256 + 3, 256), generator=generator).float() / 8
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    options = {"lr": 1e-2, "betas": (0.5, 0.5), "eps": 1e-6, "weight_decay": 0.1}
    optimizers = [LowPrecisionAdamW([ours], fused=fused, **options),
                  torch.optim.AdamW([theirs], **reference, **options)]
    for _ in range(3):
        grad = torch.randint(-4, 4, start.shape, generator=generator).float() / 4
        for param, optimizer in zip((ours, theirs), optimizers):
            param.grad = grad.clone()
            optimizer.step()
        assert torch.equal(ours, theirs)
        for key in ("exp_avg", "exp_avg_sq"):
            kept = optimizers[0].state[ours][key]
            assert kept.dtype == torch.bfloat16 and torch.equal(kept.float(), optimizers[1].state[theirs][key])


def _reference_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """AdamW by hand in float64 (torch's formula): the new parameter and the unrounded new moments."""
    p, g = param.double(), grad.double()
    m = betas[0] * exp_avg.double() + (1 - betas[0]) * g
    v = betas[1] * exp_avg_sq.double() + (1 - betas[1]) * g * g
    denom = (v.sqrt() / math.sqrt(1 - betas[1] ** step)) + eps
    return p * (1 - lr * weight_decay) - lr / (1 - betas[0] ** step) * m / denom, m, v


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_one_step_matches_a_float64_reference_with_moments_rounded_the_same_way(param_dtype):
    """From a mid-run state (step 3, bf16 moments): the stored moments are the float64 reference's,
    stochastically rounded with the same draws (exp_avg, exp_avg_sq, then a bf16 weight); the float32
    weight is the reference's to float32 rounding; a bf16 weight is that rounded with its draws."""
    generator = torch.Generator().manual_seed(2)
    shape, options = (7, 301), {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2}
    param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(param_dtype))
    grad = torch.randn(shape, generator=generator).to(param_dtype)
    exp_avg = (0.1 * torch.randn(shape, generator=generator)).bfloat16()
    exp_avg_sq = (0.02 * torch.rand(shape, generator=generator)).bfloat16()
    optimizer = LowPrecisionAdamW([param], seed=7, **options)
    optimizer.state[param] = {"step": torch.tensor(2.0), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}

    def draws(tensor: str) -> torch.Generator:  # step 3 of parameter 0, one chunk
        return torch.Generator().manual_seed(rounding_seed(7, 3, 0, tensor))

    expected, m, v = _reference_step(param.detach(), grad, exp_avg, exp_avg_sq, 3, **options)
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()

    state = optimizer.state[param]
    assert torch.equal(state["exp_avg"], stochastic_round(m.float(), draws("exp_avg")))
    assert torch.equal(state["exp_avg_sq"], stochastic_round(v.float(), draws("exp_avg_sq")))
    if param_dtype == torch.float32:
        # a few float32 roundings (decay, update, sum) of values up to |weight| + |update|: 2 ulp of that at most
        update = expected - before.double()
        bound = 2**-22 * (before.double().abs() + update.abs())
        assert ((param.detach().double() - expected).abs() <= bound).all()
    else:
        assert torch.equal(param.detach(), stochastic_round(expected.float(), draws("param")))
        low, high = _neighbours(expected.float())
        assert ((param.detach().view(torch.int16) == low) | (param.detach().view(torch.int16) == high)).all()


def _tiny_step_pair(state_dtype: torch.dtype, text_bf16: bool):
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-Tiny-32")
    if text_bf16:
        cast_text_tower(model, torch.bfloat16)
    optimizer = LowPrecisionAdamW(parameter_groups(model, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                  state_dtype=state_dtype, seed=4)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 32))

    def step():
        optimizer.zero_grad()
        image, text, scale = model(images, texts, return_features=True)
        (scale * image @ text.T).logsumexp(1).mean().backward()
        optimizer.step()
    return model, optimizer, step


@pytest.mark.parametrize("state_dtype, text_bf16", [(torch.bfloat16, True), (torch.float32, True),
                                                    (torch.bfloat16, False)])
def test_state_dict_round_trip_resumes_bit_identically(state_dtype, text_bf16):
    """Through torch.save/torch.load(weights_only): moments keep their dtype and the rounding draws continue
    from torch's state alone (Adam's step); an older checkpoint's generator state is accepted and ignored."""
    model, optimizer, step = _tiny_step_pair(state_dtype, text_bf16)
    step(), step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    assert sorted(optimizer.state_dict()) == ["param_groups", "state"]  # what DCP keeps of it
    copies = []
    for legacy in (False, True):
        copy, copy_optimizer, copy_step = _tiny_step_pair(state_dtype, text_bf16)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        if legacy:
            saved["optimizer"][LEGACY_RNG_KEY] = torch.Generator().manual_seed(99).get_state()
        copy.load_state_dict(saved["model"])
        copy_optimizer.load_state_dict(saved["optimizer"])
        for other in copy.parameters():
            assert copy_optimizer.state[other]["exp_avg"].dtype == state_dtype
        copy_step()
        copies.append(copy)
    step()
    for copy in copies:
        for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
            assert torch.equal(a, b), name


def test_rounding_draws_differ_by_step_parameter_tensor_shard_and_chunk():
    """Each part of the key gives other bits, so no two roundings in a run share draws (a shared draw would
    correlate their errors); the same key gives the same bits, which is what makes the draws stateless."""
    base = (3, 10, 2, "exp_avg", 0, 0)
    keys = [base, (4, *base[1:]), (3, 11, *base[2:]), (3, 10, 3, *base[3:]), (3, 10, 2, "exp_avg_sq", 0, 0),
            (3, 10, 2, "param", 0, 0), (3, 10, 2, "exp_avg", 15, 0), (3, 10, 2, "exp_avg", 0, CHUNK)]
    seeds = [rounding_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= seed < 2**63 for seed in seeds)
    assert rounding_seed(*base) == seeds[0]

    # Two equal parameters, equal gradients: the second (index 1) rounds its moments with other bits.
    start, grad = torch.full((64, 64), 0.3), torch.full((64, 64), 0.123)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    optimizer = LowPrecisionAdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, seed=3)
    for param in params:
        param.grad = grad.clone()
    optimizer.step()
    first, second = (optimizer.state[param]["exp_avg"] for param in params)
    assert not torch.equal(first, second)
    assert torch.equal(first, stochastic_round(grad * 0.1, torch.Generator().manual_seed(
        rounding_seed(3, 1, 0, "exp_avg"))))


def _sharded_worker(rank: int, folder: Path) -> None:
    """One of two gloo ranks: a [64, 32] parameter sharded on dim 0 and a plain (DDP-like) one, stepped once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full, grad = torch.full((64, 32), 0.3), torch.full((64, 32), 0.123)
        plain, sharded = torch.nn.Parameter(full.clone()), torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        plain.grad, sharded.grad = grad.clone(), distribute_tensor(grad, mesh, [Shard(0)])
        optimizer = LowPrecisionAdamW([plain, sharded], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, seed=3)
        optimizer.step()
        torch.save({"start": shard_start(sharded), "plain": optimizer.state[plain]["exp_avg"],
                    "sharded": optimizer.state[sharded]["exp_avg"].to_local()}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_shards_draw_their_own_bits_and_ddp_replicas_the_same(tmp_path):
    """Equal values in both halves of a sharded parameter round differently on the two ranks (keyed by
    the shard's offset); a replicated parameter rounds identically on both, as DDP needs."""
    mp.spawn(_sharded_worker, args=(tmp_path,), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["start"] for r in ranks] == [0, 32 * 32]
    assert torch.equal(ranks[0]["plain"], ranks[1]["plain"])
    assert not torch.equal(ranks[0]["sharded"], ranks[1]["sharded"])


def test_bf16_text_tower_runs_with_fp32_image_tower_in_fp32_and_bf16_autocast():
    torch.manual_seed(0)
    model = cast_text_tower(clipforge.create_model("ViT-Tiny-32"), torch.bfloat16)
    text_params = text_tower_parameters(model)
    assert {p.dtype for p in text_params} == {torch.bfloat16}
    assert {p.dtype for p in model.visual.parameters()} == {torch.float32} and model.logit_scale.dtype == torch.float32
    assert len(text_params) == sum(1 for name, _ in model.named_parameters()
                                   if not name.startswith("visual.") and name != "logit_scale")
    images, texts = torch.randn(3, 3, 32, 32), torch.randint(1, 49000, (3, 32))
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert model.encode_text(texts).dtype == torch.float32
            image, text, scale = model(images, texts, return_features=True)
        assert text.dtype == torch.float32 and image.dtype == (torch.bfloat16 if autocast else torch.float32)
        (scale * image.float() @ text.T).logsumexp(1).mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in text_params)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _losses(output_dir) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row]


def test_training_with_both_savers_learns_and_resumes_bit_identically(tmp_path):
    """40 steps with bf16 moments and a bf16 text tower lower the loss; a run stopped right after its
    step-20 checkpoint (the later one deleted) and rerun ends with the same weights and optimiser state."""
    overrides = {**TINY_RUN, **SAVERS, "max_steps": 40, "global_batch_size": 32, "lr": 2e-3, "warmup_steps": 5,
                 "save_every_steps": 20, "grad_clip_norm": 1.0, "data.num_samples": 40 * 32, "seed": 1}
    reference = tmp_path / "reference"
    train(load_train_config(None, {**overrides, "output_dir": str(reference)}))
    losses = _losses(reference)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    final = torch.load(latest_checkpoint(reference), weights_only=True)
    assert final["model"]["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.bfloat16
    assert final["model"]["visual.conv1.weight"].dtype == torch.float32
    assert final["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16

    interrupted = tmp_path / "interrupted"
    shutil.copytree(reference, interrupted)
    latest_checkpoint(interrupted).unlink()  # as if killed after saving step 20
    assert [p.name for p in list_checkpoints(interrupted)] == ["step_00000020.pt"]
    summary = train(load_train_config(None, {**overrides, "output_dir": str(interrupted)}))
    assert summary["steps_this_run"] == 20
    resumed = torch.load(latest_checkpoint(interrupted), weights_only=True)
    for key, value in final["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for index, entries in final["optimizer"]["state"].items():
        for key, value in entries.items():
            assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)
    assert LEGACY_RNG_KEY not in resumed["optimizer"]
    assert _losses(interrupted) == losses
