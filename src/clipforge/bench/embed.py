"""Image and text embedding throughput: every implementation on the same batch, interleaved.

Rows per model and precision: clipforge's float32 reference (the plain model), clipforge's
``for_inference`` path, open_clip and Hugging Face, each peer in every mode a user could pick:
open_clip's ``amp_bf16`` (autocast) and ``pure_bf16`` (weights cast), channels-last for its
ResNets, HF's bf16 weights, HF text with ``padding="max_length"`` and ``padding=True`` (longest).
With ``--compile`` every peer also runs through ``torch.compile`` (inductor with frozen weights,
the fastest inference setting it has), in rows of their own with the compile time beside them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch

import clipforge
from clipforge.bench import flops
from clipforge.bench.common import Inputs, Row, Timing, first_call_seconds, interleaved, median
from clipforge.bench.impls import Implementations, cosine, hf_features
from clipforge.transforms import image_transform

BF16 = torch.bfloat16


def pixels(inputs: Inputs, size: int, batch: int) -> torch.Tensor:
    """The batch's images through clipforge's exact (OpenAI) preprocessing, or seeded noise without data."""
    if inputs.image_paths:
        transform = image_transform(size)
        return torch.stack([transform(path) for path in inputs.image_paths[:batch]])
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: torch.autocast(device.type, dtype=BF16)


def _call(fn: Callable[[], torch.Tensor], context: Callable[[], contextlib.AbstractContextManager] | None = None):
    def run() -> torch.Tensor:
        with torch.inference_mode(), (context() if context else contextlib.nullcontext()):
            return fn()
    return run


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile(fn)`` run with inductor's weight freezing (constant folding, pre-packed weights)."""
    compiled = torch.compile(fn)

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)
    return run


def _channels_last(model: Any, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def _candidates(impls: Implementations, kind: str, x: Any, device: torch.device, precisions: list[str],
                compile: bool = False) -> dict[str, tuple[str, Callable[[], torch.Tensor], float]]:
    """name -> (precision, callable, FLOPs per item) for every implementation of this kind.

    Rows whose name contains "compile" compile on their first call (``embedding_rows`` times it).
    """
    cf, oc, hf = impls.clipforge, impls.open_clip, impls.hf
    cfg = cf.config
    out: dict[str, tuple[str, Callable[[], torch.Tensor], float]] = {}
    if kind == "image":
        full, pooled = flops.image_flops(cfg), flops.image_flops(cfg, pooled_last=True)
        out["clipforge reference"] = ("fp32", _call(lambda: cf.encode_image(x)), full)
        fast = {p: cf.for_inference(torch.float32 if p == "fp32" else BF16) for p in precisions}
        for p, model in fast.items():
            out[f"clipforge for_inference({p})"] = (p, _call(lambda m=model: m.encode_image(x)), pooled)
        if compile:  # inductor with frozen weights; the warm-up call compiles
            for p in precisions:
                model = cf.for_inference(torch.float32 if p == "fp32" else BF16, compile=True)
                out[f"clipforge for_inference({p}, compile)"] = (p, _call(lambda m=model: m.encode_image(x)), full)
        if oc is not None:
            resnet = cfg.vision.is_resnet
            out["open_clip"] = ("fp32", _call(lambda: oc.encode_image(x)), full)
            oc16 = copy.deepcopy(oc).to(BF16) if "bf16" in precisions else None
            if oc16 is not None:
                out["open_clip amp_bf16"] = ("bf16", _call(lambda: oc.encode_image(x), _autocast(device)), full)
                out["open_clip pure_bf16"] = ("bf16", _call(lambda: oc16.encode_image(x.to(BF16))), full)
            if resnet:  # channels-last convolutions: oneDNN's preferred layout
                for p, model in (("fp32", oc), ("bf16", oc16)):
                    if model is not None:
                        m, xc = _channels_last(copy.deepcopy(model), x.to(model.visual.conv1.weight.dtype))
                        label = "open_clip channels_last" if p == "fp32" else "open_clip pure_bf16 channels_last"
                        out[label] = (p, _call(lambda m=m, xc=xc: m.encode_image(xc)), full)
            if compile:
                for p, model in (("fp32", oc), ("bf16", oc16)):
                    if model is None:
                        continue
                    m, xc = copy.deepcopy(model), x.to(model.visual.conv1.weight.dtype)
                    if resnet:
                        m, xc = _channels_last(m, xc)
                    label = ("open_clip" if p == "fp32" else "open_clip pure_bf16") + (" channels_last" if resnet else "")
                    out[label + " compile"] = (p, _call(lambda f=_compiled(m.visual), xc=xc: f(xc)), full)
        if hf is not None:
            out["HF"] = ("fp32", _call(lambda: hf_features(hf.get_image_features(pixel_values=x))), full)
            if "bf16" in precisions:
                hf16 = copy.deepcopy(hf).to(BF16)
                out["HF bf16"] = ("bf16", _call(lambda: hf_features(hf16.get_image_features(pixel_values=x.to(BF16)))), full)
                if compile:
                    compiled = _compiled(copy.deepcopy(hf16).get_image_features)
                    out["HF bf16 compile"] = ("bf16", _call(lambda c=compiled: hf_features(c(pixel_values=x.to(BF16)))), full)
        return {k: v for k, v in out.items() if v[0] in precisions}
    captions, ctx = x, cf.context_length
    ids = clipforge.tokenize(captions, context_length=ctx, truncate=True).to(device)
    lengths = (ids.argmax(dim=-1) + 1).tolist()
    trimmed = max(lengths)
    out["clipforge reference"] = ("fp32", _call(lambda: cf.encode_text(ids)), flops.text_flops(cfg, trimmed))
    fast = {p: cf.for_inference(torch.float32 if p == "fp32" else BF16) for p in precisions}
    for p, model in fast.items():
        out[f"clipforge for_inference({p})"] = (p, _call(lambda m=model: m.encode_text(ids)),
                                                flops.packed_text_flops(cfg, lengths))
    if oc is not None:
        oc_ids = impls.open_clip_tokenizer(captions).to(device)
        f77 = flops.text_flops(cfg, oc_ids.shape[1])
        out["open_clip"] = ("fp32", _call(lambda: oc.encode_text(oc_ids)), f77)
        if "bf16" in precisions:
            oc16 = copy.deepcopy(oc).to(BF16)
            out["open_clip amp_bf16"] = ("bf16", _call(lambda: oc.encode_text(oc_ids), _autocast(device)), f77)
            out["open_clip pure_bf16"] = ("bf16", _call(lambda: oc16.encode_text(oc_ids)), f77)
            if compile:
                compiled = _compiled(copy.deepcopy(oc16).encode_text)
                out["open_clip pure_bf16 compile"] = ("bf16", _call(lambda c=compiled: c(oc_ids)), f77)
    if hf is not None:
        hf16 = copy.deepcopy(hf).to(BF16) if "bf16" in precisions else None
        for padding in ("max_length", True):
            enc = impls.hf_tokenizer(captions, padding=padding, max_length=ctx, truncation=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            label = "max_length" if padding == "max_length" else "longest"
            f = flops.text_flops(cfg, enc["input_ids"].shape[1])
            out[f"HF padding={label}"] = ("fp32", _call(lambda e=enc: hf_features(hf.get_text_features(**e))), f)
            if hf16 is not None:
                out[f"HF bf16 padding={label}"] = ("bf16", _call(lambda e=enc: hf_features(hf16.get_text_features(**e))), f)
                if compile and label == "longest":
                    g = _compiled(copy.deepcopy(hf16).get_text_features)
                    out[f"HF bf16 padding={label} compile"] = ("bf16", _call(lambda e=enc, g=g: hf_features(g(**e))), f)
    return {k: v for k, v in out.items() if v[0] in precisions}


def embedding_rows(impls: Implementations, kind: str, inputs: Inputs, batch: int, device: torch.device,
                   precisions: list[str], reps: int, warmup: int, ceilings: dict[str, float],
                   compile: bool = False) -> list[Row]:
    """Throughput (items/s) of every implementation embedding the same ``batch`` images or captions."""
    cf = impls.clipforge
    x: Any = pixels(inputs, cf.image_size, batch).to(device) if kind == "image" else inputs.captions[:batch]
    candidates = _candidates(impls, kind, x, device, precisions, compile)
    compile_seconds = {name: first_call_seconds(fn, device) for name, (_, fn, _) in candidates.items()
                       if "compile" in name}
    outputs = {name: fn().float() for name, (_, fn, _) in candidates.items()}
    reference, oc_out = outputs["clipforge reference"], outputs.get("open_clip")
    timing = Timing()
    times = interleaved({name: fn for name, (_, fn, _) in candidates.items()}, reps, warmup, device, timing)
    rows = []
    for name, (precision, _, item_flops) in candidates.items():
        value = batch / median(times[name])
        rows.append(Row(section=kind, model=cf.config.name, precision=precision, impl=name, value=value,
                        unit=f"{kind}s/s", seconds=times[name], flops=item_flops,
                        mfu=value * item_flops / (ceilings[precision] * 1e9) if precision in ceilings else None,
                        agree_ref=cosine(outputs[name], reference),
                        agree_open_clip=cosine(outputs[name], oc_out) if oc_out is not None and name.startswith("clipforge") else None,
                        cpu_seconds=timing.cpu.get(name, []), load=timing.mean_load(name),
                        compile_seconds=compile_seconds.get(name),
                        note=f"compiled in {compile_seconds[name]:.0f} s" if name in compile_seconds else ""))
    return rows
