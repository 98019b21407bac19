"""The paper's memory savers (CLIP, Section 2.5): bfloat16 Adam moments and a bfloat16 text tower.

fp32 AdamW keeps 16 bytes per trainable parameter (weight, gradient, two moments). bf16 moments
make it 12; a bf16 text tower (weights and gradients) takes that part of the model to 8.
bench/memory_savers.py measures both on real models.

Rounding. The paper says only that the text weights are stochastically rounded. Here the
moments are stochastically rounded too: with round-to-nearest a moment stops moving once its
increment ``(1 - beta) * (target - moment)`` is under half a bf16 ulp (2**-9 relative), so
``exp_avg_sq`` cannot follow a gradient scale within ``2**-9 / (1 - beta2)`` of itself: +-10% for
the ViT beta2 of 0.98 and +-195% (it never settles) for the ResNet 0.999. Measured on 20,000 steps
of N(0, 1) gradients: with round-to-nearest the bias-corrected second moment ends at 0.993 (0.98)
and 2.30 (0.999) instead of 1.00; stochastically rounded, at 0.998 and 1.000, as fp32. Stochastic
rounding makes every stored value an unbiased estimate of the fp32 one, at one random draw per
element. The step itself always uses the unrounded float32 moments; only what is stored is rounded.

Draws are stateless: the bits that round a chunk come from a generator seeded afresh with a hash of
(run seed, the parameter's Adam step count, its index in ``param_groups``, which tensor, where its
shard and the chunk start). Every resume path restores Adam's ``step``, so a resumed run draws what
the uninterrupted one would, with no generator state to save: under FSDP, DCP's optimiser-state
checkpoints keep only torch's keys, and its loader steps the optimiser once (lr 0) to create state.
DDP replicas draw the same bits for the same parameter; FSDP shards differ by their offset.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

CHUNK = 1 << 18  # elements updated at once: float32 scratch stays in cache and transient memory is ~7 MB
ROUNDING_STREAM = 0x5EED_0F_B16  # added to the run's seed: rounding draws never shift the data order or crops
LEGACY_RNG_KEY = "rounding_rng"  # generator state older checkpoints saved; ignored (draws are stateless now)
ROUNDED = ("exp_avg", "exp_avg_sq", "param")  # the tensors a step may round, in order; their index keys the draws
_MASK = 2**64 - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's finaliser: nearby inputs (step 7 vs 8, chunk 0 vs 1) give unrelated 64-bit outputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def rounding_seed(seed: int, step: int, param_index: int, tensor: str, shard_start: int = 0,
                  chunk_start: int = 0) -> int:
    """The generator seed for one chunk's draws: a hash of everything that tells the chunk apart.

    ``step``: the parameter's Adam step count after this update (1 on the first); ``param_index``: its
    position across ``param_groups``; ``tensor``: one of ``ROUNDED``; ``shard_start``: the linear index of
    the local shard's first element in the full parameter (0 unsharded); ``chunk_start``: the chunk's first
    element within the local tensor. A value in [0, 2**63), as ``torch.Generator.manual_seed`` takes.
    """
    value = 0
    for part in (seed + ROUNDING_STREAM, step, param_index, ROUNDED.index(tensor), shard_start, chunk_start):
        value = _splitmix64(value ^ (part & _MASK))
    return value >> 1


class _Scratch:
    """Reused float32/int buffers of CHUNK elements per device: no allocation (and no page faults) per step."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], Tensor] = {}

    def get(self, name: str, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self._buffers.get((name, device))
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self._buffers[(name, device)] = torch.empty(max(size, CHUNK), dtype=dtype, device=device)
        return buffer[:size]


def stochastic_round_(dest: Tensor, source: Tensor, generator: torch.Generator,
                      scratch: _Scratch | None = None) -> Tensor:
    """Write float32 ``source`` into bfloat16 ``dest`` rounded up with probability (dropped bits) / 2**16.

    Adds 16 uniform random bits below bf16's mantissa to the float32 bit pattern, then truncates: the
    result is one of the two neighbouring bf16 values, exact when ``source`` is one already, and its
    mean is ``source``. Both tensors are contiguous and the same size. inf stays inf and NaN stays NaN
    (except a NaN whose 7 high mantissa bits are all set, which could wrap; arithmetic makes none).
    """
    if dest.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ writes float32 into bfloat16, got {source.dtype} -> {dest.dtype}")
    scratch = scratch or _Scratch()
    flat_dest, flat_source = dest.view(-1).view(torch.int16), source.reshape(-1).view(torch.int32)
    for start in range(0, flat_source.numel(), CHUNK):
        size = min(CHUNK, flat_source.numel() - start)
        draws = scratch.get("draws", (size + 3) // 4, torch.int64, source.device)
        draws.random_(-2**63, None, generator=generator)  # 64 random bits: four 16-bit draws per element group
        bits = scratch.get("bits", size, torch.int32, source.device)
        bits.copy_(draws.view(torch.int16)[:size]).bitwise_and_(0xFFFF)
        bits.add_(flat_source[start:start + size]).bitwise_right_shift_(16)
        flat_dest[start:start + size].copy_(bits)
    return dest


def stochastic_round(source: Tensor, generator: torch.Generator) -> Tensor:
    """``source`` (float32) stochastically rounded to a new bfloat16 tensor (see ``stochastic_round_``)."""
    source = source.contiguous()
    return stochastic_round_(torch.empty_like(source, dtype=torch.bfloat16), source, generator)


def _local(tensor: Tensor) -> Tensor:
    """The shard this process holds of an FSDP2 DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_start(tensor: Tensor) -> int:
    """Linear index in the full tensor of the local shard's first element; 0 for a plain tensor.

    Distinct for every non-empty shard, and the same on ranks that hold a replica of one (HSDP), so
    shards draw different bits and replicas the same.
    """
    if not hasattr(tensor, "device_mesh"):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    start, stride = 0, 1
    for size, index in zip(reversed(tensor.shape), reversed(offset)):
        start, stride = start + index * stride, stride * size
    return start


def _step_counts(steps: list[Tensor]) -> list[int]:
    """Each parameter's Adam step count, read with one device sync per device rather than one per parameter."""
    by_device: dict[torch.device, list[int]] = {}
    for position, step in enumerate(steps):
        by_device.setdefault(step.device, []).append(position)
    counts = [0] * len(steps)
    for positions in by_device.values():
        values = torch.stack([steps[p].reshape(()).float() for p in positions]).tolist()
        for position, value in zip(positions, values):
            counts[position] = int(value)
    return counts


def _adamw_fp32_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, *, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float, fused: bool) -> None:
    """One AdamW update of float32 chunks in place: torch's fused kernel, or the same math as
    ``torch.optim.AdamW(foreach=False)`` op by op where there is none."""
    if fused:
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    count = int(step.item())
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**count) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**count))


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored in ``state_dtype`` and whose parameters may be bfloat16.

    Each update runs in float32, CHUNK elements at a time: parameter, gradient and moments are
    upcast, stepped with the fused AdamW kernel (bit-identical to ``torch.optim.AdamW(fused=True)``
    whenever the moments are representable), and bf16 moments and bf16 parameters are written
    back stochastically rounded with draws keyed by ``rounding_seed``: no state beyond torch's, so
    a resumed run (from a .pt or a DCP folder) rounds exactly as an uninterrupted one, and every
    DDP rank draws the same bits, so replicas stay identical.
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0, *, state_dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 fused: bool | None = None) -> None:
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype
        self.seed = seed
        self.fused = hasattr(torch, "_fused_adamw_") if fused is None else fused
        self._generators: dict[torch.device, torch.Generator] = {}  # reseeded per chunk: only saves allocations
        self._scratch = _Scratch()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        pairs = [(group, param) for group in self.param_groups for param in group["params"]]
        for index, (group, param) in enumerate(pairs):  # the index keys the draws: stable across resumes
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=_local(param).device)
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(param, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["step"] += 1
            work.append((index, group, param, state))
        counts = _step_counts([state["step"] for _, _, _, state in work])
        for (index, group, param, state), count in zip(work, counts):
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            key = (self.seed, count, index)
            self._update(_local(param), _local(param.grad), _local(state["exp_avg"]),
                         _local(state["exp_avg_sq"]), state["step"], hyper, key, shard_start(param))
        return loss

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        """This device's generator, reseeded: a fresh stream for one chunk."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(seed)

    def _update(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
                hyper: dict[str, float], key: tuple[int, int, int], start_in_full: int) -> None:
        """Step one (local) tensor CHUNK elements at a time; float32 pieces are stepped where they lie.

        ``key`` is (seed, step count, parameter index) and ``start_in_full`` the shard's ``shard_start``:
        with the tensor's name and the chunk's start they seed the chunk's rounding draws.
        """
        if grad.is_sparse:
            raise RuntimeError("LowPrecisionAdamW does not support sparse gradients; use dense embeddings")
        target = param if param.is_contiguous() else param.contiguous()
        flat = {"param": target.view(-1), "grad": grad.reshape(-1), "exp_avg": exp_avg.view(-1),
                "exp_avg_sq": exp_avg_sq.view(-1)}
        for start in range(0, flat["param"].numel(), CHUNK):
            end = min(start + CHUNK, flat["param"].numel())
            pieces = {}
            for name, tensor in flat.items():
                piece = tensor[start:end]
                if piece.dtype != torch.float32:
                    piece = self._scratch.get(name, end - start, torch.float32, piece.device).copy_(piece)
                pieces[name] = piece
            chunk = (pieces["param"], pieces["grad"], pieces["exp_avg"], pieces["exp_avg_sq"], step)
            try:
                _adamw_fp32_(*chunk, fused=self.fused, **hyper)
            except (RuntimeError, NotImplementedError):  # no fused kernel for this device: refused before any write
                if not self.fused:
                    raise
                self.fused = False
                _adamw_fp32_(*chunk, fused=False, **hyper)
            for name in ("exp_avg", "exp_avg_sq", "param"):
                if flat[name].dtype == torch.bfloat16:
                    generator = self._generator(pieces[name].device, rounding_seed(*key, name, start_in_full, start))
                    stochastic_round_(flat[name][start:end], pieces[name], generator, self._scratch)
                elif flat[name].dtype != torch.float32:
                    flat[name][start:end].copy_(pieces[name])
        if target is not param:
            param.copy_(target)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but moments keep ``state_dtype`` (torch would cast them to each parameter's dtype).

        Keys other than torch's (``LEGACY_RNG_KEY`` of older checkpoints) are ignored: draws are stateless.
        """
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            dtypes = {"step": torch.float32, "exp_avg": self.state_dtype, "exp_avg_sq": self.state_dtype}
            for key, dtype in dtypes.items():
                if key in saved:
                    self.state[param][key] = saved[key].to(device=_local(param).device, dtype=dtype)


# ---- The text tower, stored in bfloat16 by text_weights_dtype = "bf16". ----
TEXT_TOWER = ("token_embedding", "positional_embedding", "cls_emb", "transformer", "ln_final", "text_projection")


def text_tower_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the text tower (those of ``TEXT_TOWER`` the model has), in model order."""
    wanted = {id(p) for name in TEXT_TOWER if (part := getattr(model, name, None)) is not None
              for p in (part.parameters() if isinstance(part, nn.Module) else [part])}
    return [p for p in model.parameters() if id(p) in wanted]


def cast_text_tower(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the text tower's weights in ``dtype`` in place; the image tower and temperature keep theirs.

    ``CLIP.encode_text`` computes in the tower's dtype and returns features in the model's, so the
    loss stays in float32.
    """
    for param in text_tower_parameters(model):
        param.data = param.data.to(dtype)
    return model
