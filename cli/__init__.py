"""The `ndonnx` command (installed as the `ndonnx_cli` package)."""
