"""Deployment exports of clipforge models: ONNX image and text graphs (``clipforge export``)."""

from clipforge.export.onnx_export import DEFAULT_OPSET, TOLERANCE, export_onnx

__all__ = ["DEFAULT_OPSET", "TOLERANCE", "export_onnx"]
