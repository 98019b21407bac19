"""Run exported models without torch: onnxruntime, numpy preprocessing, numpy tokenizers.

``import clipforge.runtime`` imports neither torch nor onnxruntime; ``OnnxCLIP.load(folder)`` needs
onnxruntime (``pip install 'clipforge[onnxruntime]'``). The collection commands (embed, index, search,
serve) take an export folder wherever they take a model and then run on this path.
"""

from __future__ import annotations

from typing import Any

from clipforge.runtime.manifest import MANIFEST_NAME, is_onnx_export, read_manifest

__all__ = ["MANIFEST_NAME", "OnnxCLIP", "check_cpu_device", "is_onnx_export", "is_onnx_model", "read_manifest"]


def is_onnx_model(model: Any) -> bool:
    """Whether ``model`` is an ``OnnxCLIP`` (duck-typed, so checking never imports anything)."""
    return getattr(model, "backend", None) == "onnx"


def check_cpu_device(device: Any, option: str = "--device") -> str:
    """The ONNX path runs on the CPU: accept cpu/auto (or None), refuse anything else in one sentence."""
    name = "cpu" if device is None else str(device).strip().lower()
    if name not in ("cpu", "auto"):
        raise_device = name if len(name) <= 40 else name[:37] + "..."
        from clipforge.errors import ClipforgeError

        raise ClipforgeError(f"{option} {raise_device}: an ONNX export runs on the CPU with onnxruntime; use "
                             f"{option} cpu, or pass the original checkpoint to run on a GPU")
    return "cpu"


def __getattr__(name: str) -> Any:
    if name == "OnnxCLIP":
        from clipforge.runtime.onnx_model import OnnxCLIP

        return OnnxCLIP
    raise AttributeError(f"module 'clipforge.runtime' has no attribute {name!r}")
