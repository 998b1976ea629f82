"""Session-wide tiny teachers, exported once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zoo")
    out = {
        "resnet_legacy": models.tiny_resnet(d / "resnet_legacy.onnx"),
        "resnet_opset11": models.tiny_resnet(d / "resnet_opset11.onnx", opset=11),
        "resnet_opset9": models.tiny_resnet(d / "resnet_opset9.onnx", opset=9),
        "mobilenet": models.tiny_mobilenet(d / "mobilenet.onnx"),
        "encoder": models.tiny_encoder(d / "encoder.onnx"),
        "two_heads": models.two_heads(d / "two_heads.onnx"),
    }
    dyn = d / "dynamo"
    dyn.mkdir()
    out["resnet_dynamo"] = models.tiny_resnet(dyn / "resnet_dynamo.onnx", dynamo=True)
    out["resnet_constants"] = models.initializers_to_constants(out["resnet_legacy"], d / "resnet_constants.onnx")
    return out


@pytest.fixture(autouse=True)
def _quick_synthetic_inputs(monkeypatch):
    """Data-free runs outside tests/test_synthetic.py optimise their synthetic inputs for a few
    steps only: they test other things, and the generator's own tests set their steps."""
    import functools

    from ndonnx.distill import runner
    from ndonnx.synthetic import SyntheticConfig

    monkeypatch.setattr(runner, "SyntheticConfig", functools.partial(SyntheticConfig, steps=3, batch=256))
