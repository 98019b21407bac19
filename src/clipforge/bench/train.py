"""Training-step throughput: zero_grad, forward, contrastive loss, backward, AdamW step.

clipforge runs ``contrastive_step`` and ``make_optimizer`` exactly as ``clipforge train`` does
(fp32, or ``precision = "bf16"``: autocast). open_clip runs its ``ClipLoss`` in its ``fp32``,
``amp_bf16`` and ``pure_bf16`` precisions, with ``torch.optim.AdamW`` both as its training script
builds it (torch's default implementation) and with ``fused=True``, its fastest; with
``compile`` also through ``torch.compile`` (as its ``--torchcompile`` flag does). Hugging Face
runs ``CLIPModel(return_loss=True)`` with the Trainer's default optimiser (fused AdamW), fp32 and
bf16 autocast, on ``padding="max_length"`` ids as its contrastive example tokenizes them and on
``padding="longest"``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import torch

import clipforge
from clipforge.bench import flops
from clipforge.bench.common import Inputs, Row, Timing, first_call_seconds, interleaved, median
from clipforge.bench.embed import pixels
from clipforge.bench.impls import Implementations
from clipforge.models.clip import MAX_LOGIT_SCALE
from clipforge.training.grad_cache import contrastive_step
from clipforge.training.optim import make_optimizer, paper_betas_eps

BF16 = torch.bfloat16
LR, WEIGHT_DECAY = 1e-5, 0.1  # a small step keeps repeated steps on random weights finite


def _autocast(device: torch.device, on: bool) -> Callable[[], contextlib.AbstractContextManager]:
    return (lambda: torch.autocast(device.type, dtype=BF16)) if on else contextlib.nullcontext


class _Mode:
    """One implementation in one precision: a model copy, its optimiser, and ``step``/``grads``."""

    def __init__(self, backward: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 after_step: Callable[[], None] | None = None):
        self.backward, self.model, self.optimizer, self.after_step = backward, model, optimizer, after_step

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward()
        self.optimizer.step()
        if self.after_step:
            self.after_step()

    def grads(self) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward()
        grads = {k: p.grad.detach().float().clone() for k, p in self.model.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return grads


def _modes(impls: Implementations, images: torch.Tensor, captions: list[str], device: torch.device,
           precisions: list[str], compile: bool = False) -> dict[str, tuple[str, _Mode, int]]:
    """name -> (precision, mode, text tokens processed per sample).

    The fp32 and autocast modes of one implementation share its model and optimiser (the weights
    drift from step to step, which does not change the cost of a step); this keeps ViT-B/32 with
    AdamW states for every implementation within a few GiB.
    """
    cf = impls.clipforge.float().train()
    ctx = cf.context_length
    ids = clipforge.tokenize(captions, context_length=ctx, truncate=True).to(device)
    trimmed = int(ids.argmax(dim=-1).max()) + 1
    modes: dict[str, tuple[str, _Mode, int]] = {}
    betas, eps = paper_betas_eps(cf.config.vision.is_resnet, 0.9, None, None)
    cf_optimizer = make_optimizer(cf, LR, WEIGHT_DECAY, betas, eps)

    def clamp() -> None:  # as the training loop does after every step
        with torch.no_grad():
            cf.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    for p in precisions:
        context = _autocast(device, p == "bf16")

        def backward(ac=context) -> None:
            contrastive_step(cf, images, ids, micro_batch=None, autocast=ac)

        modes[f"clipforge {p}"] = (p, _Mode(backward, cf, cf_optimizer, clamp), trimmed)
    if impls.open_clip is not None:
        modes.update(_open_clip_modes(impls, images, captions, device, precisions, compile))
    if impls.hf is not None:
        hf = impls.hf.train()
        hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        for padding, suffix in (("max_length", ""), ("longest", " padding=longest")):
            enc = impls.hf_tokenizer(captions, padding=padding, max_length=ctx, truncation=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            for p in precisions:
                context = _autocast(device, p == "bf16")

                def backward(ac=context, enc=enc) -> None:
                    with ac():
                        loss = hf(pixel_values=images, return_loss=True, **enc).loss
                    loss.backward()

                modes[f"HF {p}{suffix}"] = (p, _Mode(backward, hf, hf_optimizer), enc["input_ids"].shape[1])
    return modes


def _open_clip_modes(impls: Implementations, images: torch.Tensor, captions: list[str], device: torch.device,
                     precisions: list[str], compile: bool) -> dict[str, tuple[str, _Mode, int]]:
    """open_clip's precisions, each with its script's AdamW and with the fused one (+ compiled)."""
    import open_clip

    loss_fn = open_clip.ClipLoss()
    oc_ids = impls.open_clip_tokenizer(captions).to(device)
    oc = impls.open_clip.train()
    optimizers = {fused: torch.optim.AdamW(oc.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused or None)
                  for fused in (False, True)}
    pure = copy.deepcopy(oc).to(BF16) if "bf16" in precisions else None
    pure_optimizer = (torch.optim.AdamW(pure.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
                      if pure is not None else None)
    modes: dict[str, tuple[str, _Mode, int]] = {}

    def add(name: str, precision: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: bool,
            forward: Callable[..., Any] | None = None) -> None:
        if precision not in precisions:
            return
        x = images.to(next(model.parameters()).dtype)
        context, run = _autocast(device, amp), (forward if forward is not None else model)

        def backward() -> None:
            with context():
                image_f, text_f, scale = run(x, oc_ids)[:3]
                loss = loss_fn(image_f, text_f, scale)
            loss.backward()

        modes[name] = (precision, _Mode(backward, model, optimizer), oc_ids.shape[1])

    add("open_clip fp32", "fp32", oc, optimizers[False], False)
    add("open_clip fp32 fused AdamW", "fp32", oc, optimizers[True], False)
    add("open_clip amp_bf16", "bf16", oc, optimizers[False], True)
    add("open_clip amp_bf16 fused AdamW", "bf16", oc, optimizers[True], True)
    if pure is not None:
        add("open_clip pure_bf16 fused AdamW", "bf16", pure, pure_optimizer, False)
    if compile:
        add("open_clip amp_bf16 fused AdamW compile", "bf16", oc, optimizers[True], True, torch.compile(oc))
    return modes


def _hf_grads_as_openai(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from clipforge.checkpoints.hf import hf_to_openai

    return hf_to_openai(grads)


def _agreement(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float, str]:
    """(cosine of the flattened gradients, worst cosine over weight matrices, that matrix's name), in float64."""
    dot = norm_a = norm_b = 0.0
    worst, worst_key = 1.0, ""
    for k in reference:
        if k not in grads:
            continue
        a, b = grads[k].flatten().double(), reference[k].flatten().double()
        d, na, nb = float(a @ b), float(a @ a), float(b @ b)
        dot, norm_a, norm_b = dot + d, norm_a + na, norm_b + nb
        if reference[k].ndim >= 2 and na > 0 and nb > 0 and d / (na * nb) ** 0.5 < worst:
            worst, worst_key = d / (na * nb) ** 0.5, k
    return dot / max((norm_a * norm_b) ** 0.5, 1e-300), worst, worst_key


def train_rows(impls: Implementations, inputs: Inputs, batch: int, device: torch.device, precisions: list[str],
               reps: int, warmup: int, ceilings: dict[str, float], compile: bool = False) -> list[Row]:
    """Samples/s of one training step per implementation and precision, with gradient agreement."""
    cf = impls.clipforge
    images = pixels(inputs, cf.image_size, batch).to(device)
    captions = inputs.captions[:batch]
    modes = _modes(impls, images, captions, device, precisions, compile)
    # The first forward+backward of a compiled mode compiles; timed apart, before any weight changes.
    compile_seconds = {name: first_call_seconds(mode.grads, device) for name, (_, mode, _) in modes.items()
                       if "compile" in name}
    # Gradients of one step from the same weights, before any optimiser step: references first,
    # then each mode compared and dropped (ViT-B/32 gradients are 600 MB each).
    def gradients(name: str) -> dict[str, torch.Tensor]:
        g = modes[name][1].grads()
        return _hf_grads_as_openai(g) if name.startswith("HF") else g

    references = {name: gradients(name) for name in ("clipforge fp32", "open_clip fp32") if name in modes}
    agreements: dict[str, Any] = {}
    for name in modes:
        g = references[name] if name in references else gradients(name)
        reference = references.get("clipforge fp32", references.get("open_clip fp32", g))
        oc_ref = references.get("open_clip fp32")
        agreements[name] = (_agreement(g, reference), _agreement(g, oc_ref) if oc_ref is not None else None)
        del g
    references.clear()
    timing = Timing()
    times = interleaved({name: mode.step for name, (_, mode, _) in modes.items()}, reps, warmup, device, timing)
    rows = []
    for name, (precision, _, tokens) in modes.items():
        value = batch / median(times[name])
        per_sample = flops.train_flops(cf.config, tokens)
        (flat, worst, worst_key), vs_oc = agreements[name]
        rows.append(Row(section="train", model=f"{cf.config.name} (batch {batch})", precision=precision, impl=name,
                        value=value, unit="samples/s", seconds=times[name], flops=per_sample,
                        mfu=value * per_sample / (ceilings[precision] * 1e9) if precision in ceilings else None,
                        agree_ref=flat, agree_open_clip=vs_oc[0] if vs_oc else None,
                        cpu_seconds=timing.cpu.get(name, []), load=timing.mean_load(name),
                        compile_seconds=compile_seconds.get(name),
                        note=(f"compiled in {compile_seconds[name]:.0f} s; " if name in compile_seconds else "")
                        + f"text tokens {tokens}; worst weight-matrix grad cosine {worst:.6f} ({worst_key})"))
    return rows
