"""The contrastive loss and gradient caching equal the naive full-batch computation, on 1 and 2 processes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY_RESNET, TINY_VIT, randomize_, relative_error
from torch.utils._python_dispatch import TorchDispatchMode

import clipforge
from clipforge.models import config_from_dict
from clipforge.training.grad_cache import contrastive_step
from clipforge.training.loss import clip_loss, naive_clip_loss

WORLD = 2


def features(n: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image, text = (F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
                   for _ in range(2))
    return image.to(dtype), text.to(dtype)


def loss_and_grads(loss_fn, image, text, scale, **kwargs) -> list[torch.Tensor]:
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), scale.clone().requires_grad_()]
    loss = loss_fn(*leaves, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n, dim, chunk", [(2, 4, None), (10, 8, 3), (10, 8, 1), (10, 8, 64), (37, 16, 5),
                                           (64, 32, None), (64, 32, 64), (129, 24, 16)])
def test_clip_loss_equals_naive(n: int, dim: int, chunk: int | None, dtype: torch.dtype, tolerance: float) -> None:
    image, text = features(n, dim, dtype, seed=n)
    scale = torch.tensor(1 / 0.07, dtype=dtype)
    expected = loss_and_grads(naive_clip_loss, image, text, scale)
    actual = loss_and_grads(clip_loss, image, text, scale, chunk_size=chunk)
    for name, a, e in zip(["loss", "d image", "d text", "d scale"], actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert relative_error(a, e) < tolerance, (name, relative_error(a, e))


def test_clip_loss_low_precision_accumulates_in_float32() -> None:
    image, text = features(256, 64, torch.float32)
    exact = naive_clip_loss(image.double(), text.double(), 100.0)
    loss = clip_loss(image.bfloat16(), text.bfloat16(), torch.tensor(100.0), chunk_size=100)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - exact.item()) < 2e-4 * exact.item()  # only the inputs' bf16 rounding remains


def test_clip_loss_rejects_bad_input() -> None:
    image, text = features(4, 8, torch.float32)
    with pytest.raises(ValueError, match="same shape|one shape"):
        clip_loss(image, text[:3], 10.0)
    with pytest.raises(ValueError, match="chunk_size"):
        clip_loss(image, text, 10.0, chunk_size=0)


class _LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_chunked_loss_never_holds_full_logits() -> None:
    n, dim, chunk = 2048, 32, 256
    image, text = (x.requires_grad_() for x in features(n, dim, torch.float32))
    scale = torch.tensor(20.0, requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), \
            _LargestOutput() as mode:
        loss = clip_loss(image, text, scale, chunk_size=chunk)
        loss.backward()
    assert saved and max(saved) <= n * dim  # only inputs and [n] vectors are kept for backward
    assert mode.largest <= chunk * n  # no op, forward or backward, made more than chunk x N logits
    naive_saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: naive_saved.append(t.numel()) or t, lambda t: t):
        naive_clip_loss(image, text, scale)
    assert max(naive_saved) == n * n  # the check would catch a full matrix


def random_texts(count: int, context: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    texts = torch.randint(1, 49000, (count, context), generator=generator)
    ends = torch.randint(2, context, (count,), generator=generator)
    texts[torch.arange(count), ends] = 49407  # [EOS], the largest id
    texts[torch.arange(context)[None] > ends[:, None]] = 0
    return texts


def naive_gradients(model: clipforge.CLIP, images: torch.Tensor, texts: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = naive_clip_loss(model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True),
                           model.logit_scale_value())
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(model: torch.nn.Module, expected: dict, tolerance: float = 1e-5) -> None:
    """Relative error per tensor; a gradient that is zero in exact arithmetic (attention-pool key bias:
    softmax ignores a shift shared by all keys) is measured against the model's largest gradient / 1000."""
    floor = 1e-3 * max(float(g.abs().max()) for g in expected.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        error = float((p.grad - expected[name]).abs().max()) / max(float(expected[name].abs().max()), floor)
        assert error < tolerance, (name, error)


@pytest.mark.parametrize("config, train, micro, chunk", [(TINY_VIT, True, 5, None), (TINY_VIT, True, 24, 7),
                                                         (TINY_RESNET, False, 5, 4)])
def test_contrastive_step_equals_full_batch(config: dict, train: bool, micro: int, chunk: int | None) -> None:
    torch.manual_seed(0)
    model = randomize_(clipforge.create_model(config_from_dict(config))).train(train)
    images = torch.randn(24, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(2))
    texts = random_texts(24, model.context_length, seed=3)
    loss, expected = naive_gradients(model, images, texts)
    model.zero_grad(set_to_none=True)
    buffers = copy.deepcopy(list(model.buffers()))
    result = contrastive_step(model, images, texts, micro_batch=micro, chunk_size=chunk)
    assert abs(float(result["loss"]) - loss) < 1e-5 * abs(loss)
    assert result["logit_scale"] == pytest.approx(model.logit_scale_value().item())
    assert_same_gradients(model, expected)
    assert "forward" not in model.__dict__  # the swap was undone
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_contrastive_step_updates_batchnorm_statistics_once() -> None:
    model = clipforge.create_model(config_from_dict(TINY_RESNET)).train()
    images, texts = torch.randn(10, 3, 64, 64), random_texts(10, 77, seed=1)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for start in (0, 4, 8):
            reference.encode_image(images[start:start + 4])
    contrastive_step(model, images, texts, micro_batch=4)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name


def test_contrastive_step_replays_randomness() -> None:
    """A tower that draws random numbers sees the same draws in the cached pass and in the re-forward."""
    torch.manual_seed(0)
    model = clipforge.create_model(config_from_dict(TINY_VIT))
    encode_image = model.encode_image  # one random factor per call, like a stochastic layer
    model.encode_image = lambda x, normalize=False: encode_image(x * (1 + 0.5 * torch.rand(())), normalize)
    images, texts = torch.randn(12, 3, 32, 32), random_texts(12, 77, seed=1)
    torch.manual_seed(5)  # reference: a full graph over the same micro-batches in the same order
    parts = [(model.encode_image(images[i:i + 4], True), model.encode_text(texts[i:i + 4], True)) for i in (0, 4, 8)]
    naive_clip_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                    model.logit_scale_value()).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    after_reference = torch.rand(())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    contrastive_step(model, images, texts, micro_batch=4)
    assert_same_gradients(model, expected)
    assert torch.equal(torch.rand(()), after_reference)  # the RNG advanced as one pass would
    _, full_batch = naive_gradients(model, images, texts)
    assert relative_error(full_batch["visual.proj"], expected["visual.proj"]) > 1e-3  # the draws matter


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, text = features(12, 8, torch.float64)
        rows = slice(rank * 6, (rank + 1) * 6)
        leaves = [image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_(),
                  torch.tensor(14.0, dtype=torch.float64, requires_grad=True)]
        loss = clip_loss(*leaves, chunk_size=4)
        loss.backward()
        torch.manual_seed(0)
        model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT)))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        texts = random_texts(16, 77, seed=3)
        local = slice(rank * 8, (rank + 1) * 8)
        contrastive_step(ddp, images[local], texts[local], micro_batch=3)
        torch.save({"loss": loss.detach(), "grads": [leaf.grad for leaf in leaves],
                    "params": {name: p.grad for name, p in model.named_parameters()}}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_full_batch_gradient(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    image, text = features(12, 8, torch.float64)
    scale = torch.tensor(14.0, dtype=torch.float64)
    loss, d_image, d_text, d_scale = loss_and_grads(naive_clip_loss, image, text, scale)
    # The global loss is the mean of the ranks' losses.
    assert abs(sum(float(r["loss"]) for r in results) / WORLD - float(loss)) < 1e-12
    # The gather's backward sums all ranks' gradients, so each rank holds W x dL/d(its features)...
    for rank, r in enumerate(results):
        rows = slice(rank * 6, (rank + 1) * 6)
        assert relative_error(r["grads"][0] / WORLD, d_image[rows]) < 1e-10
        assert relative_error(r["grads"][1] / WORLD, d_text[rows]) < 1e-10
    # ...while the scale is not gathered: the mean of the ranks' gradients is dL/dscale.
    assert abs(sum(float(r["grads"][2]) for r in results) / WORLD - float(d_scale)) < 1e-12
    # DDP's mean of parameter gradients, through gradient caching, is the full-batch gradient.
    torch.manual_seed(0)
    model = randomize_(clipforge.create_model(config_from_dict(TINY_VIT)))
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, expected = naive_gradients(model, images, random_texts(16, 77, seed=3))
    for r in results:
        for name, p in model.named_parameters():
            p.grad = r["params"][name]
        assert_same_gradients(model, expected)
