"""Every speed path computes the same function: issue #5's agreement bars, enforced on tiny models.

float32 fast paths must agree with the float32 reference to cosine similarity >= 0.99999, bf16
paths to >= 0.999, for embeddings and for training-step gradients. The benchmark suite itself
must run end to end and write valid JSON.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CAPTIONS,
    FLICKR_CAPTIONS,
    SHARED_DATA,
    TINY_RESNET,
    TINY_VIT,
    images_for,
    randomize_,
)

import clipforge
from clipforge.bench import flops
from clipforge.models.config import config_from_dict
from clipforge.models.layers import attention
from clipforge.models.vision_transformer import patchify
from clipforge.training.grad_cache import contrastive_step
from clipforge.training.optim import make_optimizer

FP32_BAR, BF16_BAR = 0.99999, 0.999
ARCHITECTURES = {"vit": TINY_VIT, "resnet": TINY_RESNET, "vit-gelu": {**TINY_VIT, "quick_gelu": False}}


def _model(arch: str) -> clipforge.CLIP:
    torch.manual_seed(0)
    return randomize_(clipforge.create_model(config_from_dict(ARCHITECTURES[arch]))).eval()


def _worst_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("dtype, bar", [(torch.float32, FP32_BAR), (torch.bfloat16, BF16_BAR)], ids=["fp32", "bf16"])
def test_for_inference_keeps_the_function(arch, dtype, bar):
    model = _model(arch)
    images, text = images_for(model.image_size, count=4), clipforge.tokenize(CAPTIONS)
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(images), model.encode_text(text)
        logits_ref = model(images, text)[0]
    fast = model.for_inference(dtype)
    image_out, text_out = fast.encode_image(images), fast.encode_text(text)
    assert image_out.dtype == text_out.dtype == torch.float32
    assert _worst_cosine(image_out, image_ref) >= bar
    assert _worst_cosine(text_out, text_ref) >= bar
    logits = fast(images, text)[0]
    assert torch.allclose(logits, logits_ref, atol=100 * (1 - bar) ** 0.5 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_for_inference_without_onednn_keeps_the_function(arch, monkeypatch):
    """The path CUDA and builds without oneDNN take: F.linear / F.conv2d plus elementwise ops."""
    from clipforge.models import inference_layers as layers, modified_resnet

    monkeypatch.setattr(layers, "onednn_available", lambda dtype: False)
    monkeypatch.setattr(modified_resnet, "onednn_available", lambda dtype: False)
    model = _model(arch)
    images, text = images_for(model.image_size, count=4), clipforge.tokenize(CAPTIONS)
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(images), model.encode_text(text)
    for dtype, bar in ((torch.float32, FP32_BAR), (torch.bfloat16, BF16_BAR)):
        fast = model.for_inference(dtype)
        assert not fast.transformer.resblocks[0].qkv.onednn
        assert _worst_cosine(fast.encode_image(images), image_ref) >= bar
        assert _worst_cosine(fast.encode_text(text), text_ref) >= bar


def test_for_inference_is_a_frozen_copy():
    model = _model("resnet")
    before = copy.deepcopy(model.state_dict())
    fast = model.for_inference(torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm folding copied
    assert not any(p.requires_grad for p in fast.parameters())
    assert fast.encode_text(clipforge.tokenize([])).shape == (0, model.config.embed_dim)


def test_inference_text_ignores_padding_and_pools_each_eos():
    model = _model("vit")
    fast = model.for_inference()
    text = clipforge.tokenize(CAPTIONS)
    short = fast.encode_text(text[:, :40])  # every caption ends before 40 tokens
    assert torch.equal(short, fast.encode_text(text))  # trimmed to the same longest caption
    one_by_one = torch.cat([fast.encode_text(row[None]) for row in text])
    assert _worst_cosine(one_by_one, fast.encode_text(text)) >= FP32_BAR


def test_shared_prefixes_are_computed_once_and_keep_the_function():
    """Causal text: captions that start alike share rows; the features equal the plain model's."""
    from clipforge.models.inference_layers import shared_prefixes

    captions = ["a photo of a dog.", "a photo of a cat.", "a photo of a dog.", "a bad photo of a dog.", "two men",
                "a", ""]
    ids = clipforge.tokenize(captions)
    lengths = ids.argmax(dim=-1) + 1
    first, grid_rows = shared_prefixes(ids, lengths)
    distinct = {tuple(row[: n + 1]) for row, n in zip(ids.tolist(), ids.argmax(dim=-1).tolist()) for n in range(n + 1)}
    assert len(first) == len(distinct) < int(lengths.sum())  # one row per distinct prefix, counted another way
    length = ids.shape[1]
    for b, n in enumerate(lengths.tolist()):  # each position reads the row first computed for the same prefix
        for p in range(length):
            row = grid_rows[b * length + p]
            if p >= n:
                assert row == len(first)  # the zero row
            else:
                fb, fp = divmod(first[row], length)
                assert fp == p and torch.equal(ids[fb, : p + 1], ids[b, : p + 1])
    model = _model("vit")
    with torch.no_grad():
        reference = model.encode_text(ids)
    for dtype, bar in ((torch.float32, FP32_BAR), (torch.bfloat16, BF16_BAR)):
        out = model.for_inference(dtype).encode_text(ids)
        assert _worst_cosine(out, reference) >= bar
        if dtype == torch.float32:
            assert torch.allclose(out, reference, atol=1e-5)
            assert torch.equal(out[0], out[2])  # identical captions share every row


def test_explicit_inference_attention_equals_sdpa():
    from clipforge.models.layers import explicit_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    for causal in (False, True):
        assert torch.allclose(explicit_attention(q, k, v, causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                              atol=1e-6)
    keep = torch.rand(2, 1, 1, 9) > 0.3
    keep[..., 0] = True
    assert torch.allclose(explicit_attention(q[:, :, :1], k, v, keep=keep),
                          F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=keep), atol=1e-6)


def test_explicit_attention_equals_sdpa_in_value_and_gradient():
    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = attention(q, k, v, causal=causal)  # the explicit path: grad enabled, CPU, short
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.allclose(out, expected, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, expected_grads))


def test_patchify_matmul_equals_the_patch_convolution():
    conv = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=False).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(F.linear(patchify(x, 8), conv.weight.flatten(1)), expected, atol=1e-12)


def _gradients(model: torch.nn.Module, images, text, autocast=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    kwargs = {"autocast": autocast} if autocast else {}
    contrastive_step(model, images, text, micro_batch=None, **kwargs)
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _openai_twin(model: clipforge.CLIP) -> torch.nn.Module:
    """OpenAI's own CLIP (SDPA-free attention, a real patch convolution) with the same weights."""
    clip_model = pytest.importorskip("clip.model")
    cfg = model.config
    v, t = cfg.vision, cfg.text
    twin = clip_model.CLIP(cfg.embed_dim, v.image_size, tuple(v.layers) if v.is_resnet else v.layers, v.width,
                           v.patch_size, t.context_length, t.vocab_size, t.width, t.heads, t.layers)
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_training_step_gradients_agree(arch):
    model = _model(arch).train()  # a ResNet normalises with batch statistics, in both twins
    images, text = images_for(model.image_size, count=4), clipforge.tokenize(CAPTIONS[:4])
    ours = _gradients(model, images, text)
    twin = _openai_twin(model).train()
    twin.zero_grad(set_to_none=True)
    features = twin.encode_image(images), twin.encode_text(text.long())
    image_f, text_f = (F.normalize(f, dim=-1) for f in features)
    logits = twin.logit_scale.exp() * image_f @ text_f.t()
    labels = torch.arange(4)
    (0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))).backward()
    reference = {k: p.grad for k, p in twin.named_parameters() if p.grad is not None}
    scale = torch.cat([g.flatten() for g in reference.values()]).norm()
    for name, grad in ours.items():
        if reference[name].norm() < 1e-6 * scale:  # zero in exact arithmetic (the attention pool's key bias)
            assert (grad - reference[name]).norm() < 1e-6 * scale, name
            continue
        assert F.cosine_similarity(grad.flatten().double(), reference[name].flatten().double(), dim=0) >= FP32_BAR, name
    if arch == "resnet":
        return  # bf16 autocast through train-mode BatchNorm agrees only to ~0.99 (docs/benchmarks.md): no bf16 claim
    # bf16 autocast (precision = "bf16" in training) against float32, on the flattened gradient as issue #5 allows:
    # single small tensors such as the positional embedding land near 0.9987, in open_clip's autocast as in ours.
    mixed = _gradients(model, images, text, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    flat = F.cosine_similarity(torch.cat([mixed[k].flatten() for k in ours]).double(),
                               torch.cat([ours[k].flatten() for k in ours]).double(), dim=0)
    assert flat >= BF16_BAR


def test_fused_adamw_makes_the_same_update_as_foreach():
    model = _model("vit").train()
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    assert fused.defaults.get("fused")
    reference = torch.optim.AdamW(
        [{"params": [dict(twin.named_parameters())[n] for n, p in model.named_parameters() if any(p is q for q in g["params"])],
          "weight_decay": g["weight_decay"]} for g in fused.param_groups],
        lr=1e-3, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_analytic_flops_equal_pytorchs_flop_counter(arch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(arch)
    images, text = images_for(model.image_size, count=2), clipforge.tokenize(CAPTIONS[:2])
    length = int(text.argmax(dim=-1).max()) + 1
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():  # the counter sees attention only as plain matmuls
        with FlopCounterMode(display=False) as counter:
            model.visual(images)
        assert counter.get_total_flops() == 2 * flops.image_flops(model.config)  # per image, 2 images
        with FlopCounterMode(display=False) as counter:
            model.encode_text(text)
        assert counter.get_total_flops() == 2 * flops.text_flops(model.config, length)


def _jpegs(count: int) -> list:
    folder = SHARED_DATA / "flickr8k" / "images"
    if not folder.is_dir():
        pytest.skip(f"Flickr8k images not found under {folder}")
    return sorted(folder.glob("*.jpg"))[:count]


def test_draft_transform_is_exact_without_reduction_and_close_with_it(tmp_path):
    from clipforge.errors import ImageError
    from clipforge.transforms.image import DraftImageTransform, ImageTransform

    paths = _jpegs(4)  # 128 x 128: no reduction at 224 or 96, 1/2 at 64
    for size in (224, 96):
        assert all(torch.equal(DraftImageTransform(size)(p), ImageTransform(size)(p)) for p in paths)
    std = torch.tensor(clipforge.transforms.OPENAI_STD).view(3, 1, 1)
    for p in paths:
        difference = (DraftImageTransform(64)(p) - ImageTransform(64)(p)).abs() * std * 255
        assert difference.mean() < 8  # a few 0-255 levels on average
    png = tmp_path / "a.png"
    from PIL import Image

    Image.open(paths[0]).save(png)
    assert torch.equal(DraftImageTransform(64)(png), ImageTransform(64)(png))  # not a JPEG: the exact path
    with pytest.raises(ImageError, match="no such file"):
        DraftImageTransform(64)(tmp_path / "missing.jpg")


def test_benchmark_quick_run_writes_valid_json(tmp_path, capsys):
    pytest.importorskip("open_clip")
    from clipforge.bench.__main__ import main

    out = tmp_path / "bench.json"
    sections = "image,text,train,tokenizer,decode,loss" if FLICKR_CAPTIONS.is_file() else "image,text,train,loss"
    threads = torch.get_num_threads()
    try:  # one thread: on a shared machine OpenMP's spinning threads make tiny models 10x slower
        code = main(["--quick", "--reps", "1", "--warmup", "0", "--threads", "1", "--models", "ViT-Tiny-32",
                     "--train-models", "ViT-Tiny-32:4", "--only", sections, "--loss-sizes", "64", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    payload = json.loads(out.read_text())  # strict JSON: no NaN
    rows = payload["rows"]
    assert {r["section"] for r in rows} == set(sections.split(","))
    assert payload["ceilings_gflops"]["fp32"] > 0
    fast = [r for r in rows if r["section"] in ("image", "text") and r["impl"].startswith("clipforge for_inference")]
    assert fast and all(r["agree_ref"] >= (FP32_BAR if r["precision"] == "fp32" else BF16_BAR) for r in fast)
    assert all(r["value"] > 0 for r in rows if r["section"] != "loss")
    assert "| clipforge" in capsys.readouterr().out


def test_compile_failure_falls_back_to_the_eager_fast_path(monkeypatch):
    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _model("vit")
    images = images_for(model.image_size, count=2)
    fast = model.for_inference(compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        out = fast.encode_image(images)
    assert torch.equal(out, model.for_inference().encode_image(images))
    assert fast.encode_image(images).shape == out.shape  # no second warning: the eager path for good


def test_frozen_resnet_sub_batches_keep_the_function():
    from clipforge.models.modified_resnet import CPU_SUB_BATCH

    model = _model("resnet")
    images = images_for(model.image_size, count=CPU_SUB_BATCH + 3)  # one full sub-batch and a partial one
    with torch.no_grad():
        reference = model.encode_image(images)
    out = model.for_inference(torch.float32).encode_image(images)
    assert out.shape == reference.shape and _worst_cosine(out, reference) >= FP32_BAR
