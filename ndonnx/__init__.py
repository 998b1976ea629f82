"""ndonnx: compress ONNX models by Neighbourhood Distillation."""

__version__ = "0.1.0"
