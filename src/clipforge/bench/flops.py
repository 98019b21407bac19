"""Model FLOPs, analytically: 2 x multiply-accumulates of every matmul and convolution, attention included.

Elementwise work (norms, activations, softmax, residual adds) is not counted: it is memory-bound
and small next to the matmuls, and MFU conventionally counts matmul FLOPs only.

Per layer of a transformer with width W, MLP width M and n tokens:
    linear = 2 n (3W^2 + W^2 + 2WM)           qkv, out_proj, c_fc, c_proj
    attention = 4 n^2 W                       q k^T and attn v, every head (causal masks are counted full)
clipforge's inference path packs text tokens (T = the captions' real lengths summed) for every
per-token matmul and pads to the longest caption L only inside attention (4 L^2 W per sequence).
A "pooled" last layer (clipforge's inference path) computes qkv for all n tokens but attention,
out_proj and the MLP for the one pooled row: 2n 3W^2 + 4nW + 2(W^2 + 2WM).
Text counts the tokens each implementation actually processes: 77 (or the context) for open_clip
and Hugging Face with max-length padding, the batch's longest caption for clipforge and for HF
with padding=True. A training step counts 3x the forward (backward ~ 2x forward).
"""

from __future__ import annotations

from clipforge.models.config import ModelConfig


def _layer(n: int, width: int, mlp: int) -> float:
    return 2 * n * (4 * width * width + 2 * width * mlp) + 4 * n * n * width


def _pooled_layer(n: int, width: int, mlp: int) -> float:
    return 2 * n * 3 * width * width + 4 * n * width + 2 * (width * width + 2 * width * mlp)


def transformer_flops(n: int, width: int, layers: int, mlp_ratio: float, pooled_last: bool = False) -> float:
    mlp = int(width * mlp_ratio)
    if pooled_last:
        return (layers - 1) * _layer(n, width, mlp) + _pooled_layer(n, width, mlp)
    return layers * _layer(n, width, mlp)


def vit_image_flops(config: ModelConfig, pooled_last: bool = False) -> float:
    """FLOPs to embed one image with a ViT tower."""
    v = config.vision
    grid = v.grid_size
    patch = 2 * grid * grid * 3 * v.patch_size ** 2 * v.width
    body = transformer_flops(grid * grid + 1, v.width, v.layers, v.mlp_ratio, pooled_last)
    return patch + body + 2 * v.width * config.embed_dim


def resnet_image_flops(config: ModelConfig) -> float:
    """FLOPs to embed one image with CLIP's ModifiedResNet (convs, then the attention pool)."""
    v = config.vision
    size, width = v.image_size, v.width

    def conv(cin: int, cout: int, k: int, out: int) -> float:
        return 2 * cin * cout * k * k * out * out

    res = size // 2
    total = conv(3, width // 2, 3, res) + conv(width // 2, width // 2, 3, res) + conv(width // 2, width, 3, res)
    res //= 2  # stem average pool
    inplanes = width
    for stage, blocks in enumerate(v.layers):
        planes = width * 2 ** stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            out = res // stride
            total += conv(inplanes, planes, 1, res) + conv(planes, planes, 3, res) + conv(planes, planes * 4, 1, out)
            if stride > 1 or inplanes != planes * 4:
                total += conv(inplanes, planes * 4, 1, out)
            inplanes, res = planes * 4, out
    channels, n = width * 32, res * res + 1
    # query for the mean token only (OpenAI, open_clip and clipforge alike), keys/values for all n
    total += 2 * channels * channels + 2 * n * 2 * channels * channels + 4 * n * channels
    return total + 2 * channels * config.embed_dim


def image_flops(config: ModelConfig, pooled_last: bool = False) -> float:
    return resnet_image_flops(config) if config.vision.is_resnet else vit_image_flops(config, pooled_last)


def text_flops(config: ModelConfig, tokens: int, pooled_last: bool = False) -> float:
    """FLOPs to embed one text of ``tokens`` processed positions."""
    t = config.text
    return transformer_flops(tokens, t.width, t.layers, t.mlp_ratio, pooled_last) + 2 * t.width * config.embed_dim


def packed_text_flops(config: ModelConfig, lengths: list[int]) -> float:
    """Per-text FLOPs of clipforge's inference text path: packed tokens, padded attention, pooled last layer."""
    from clipforge.models.inference_layers import PACK_MIN_PADDING

    t = config.text
    batch, grid = len(lengths), max(lengths)
    tokens = sum(lengths)
    if tokens > (1 - PACK_MIN_PADDING) * batch * grid:
        tokens = batch * grid  # not worth packing: the dense grid runs
    width, mlp = t.width, int(t.width * t.mlp_ratio)
    per_token = 2 * (4 * width * width + 2 * width * mlp)
    full = tokens * per_token + batch * 4 * grid * grid * width
    last = tokens * 2 * 3 * width * width + batch * (4 * grid * width + 2 * (width * width + 2 * width * mlp))
    return ((t.layers - 1) * full + last) / batch + 2 * width * config.embed_dim


def train_flops(config: ModelConfig, text_tokens: int) -> float:
    """FLOPs of one training sample: 3 x (image forward + text forward)."""
    return 3 * (image_flops(config) + text_flops(config, text_tokens))
