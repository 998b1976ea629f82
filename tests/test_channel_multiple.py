"""`--channel-multiple N` / `width:k@N`, `lowrank:r@N`: student sizes rounded to a multiple of N
(onnxruntime's blocked CPU convolutions take channel counts in multiples of 8 or 16)."""

from __future__ import annotations

import pytest

from ndonnx.candidates import parse_candidates, with_multiple
from ndonnx.candidates.base import scaled
from ndonnx.candidates.lowrank import factor
from ndonnx.candidates.onnx_edit import shapes
from ndonnx.candidates.width import shrink
from ndonnx.config import DistillConfig
from ndonnx.convert import extract
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import run_sample


@pytest.mark.parametrize("size, k, m, want", [
    (16, 0.25, 1, 4), (16, 0.25, 8, 8), (64, 0.3, 8, 16), (64, 0.7, 16, 48), (16, 0.75, 8, 16), (5, 0.5, 8, 5),
    (44, 0.6875, 8, 32),
])
def test_scaled_rounds_to_the_multiple(size, k, m, want):
    assert scaled(size, k, m) == want


def test_spec_syntax_and_the_global_option():
    specs = parse_candidates("width:0.25,width:0.5@16,lowrank:0.5,identity,sparse:0.5")
    assert [str(s) for s in with_multiple(specs, 8)] == ["width:0.25@8", "width:0.5@16", "lowrank:0.5@8",
                                                         "identity", "sparse:0.5"]
    assert with_multiple(specs, 1) == specs
    assert [str(s) for s in parse_candidates("width:0.1-0.3/0.1@8")] == ["width:0.1@8", "width:0.2@8", "width:0.3@8"]
    for bad, says in (("sparse:0.5@8", "only width and lowrank"), ("width:0.5@x", "not a whole number"),
                      ("width:0.5@0", ">= 1")):
        with pytest.raises(NdonnxError, match=says):
            parse_candidates(bad)
    with pytest.raises(NdonnxError, match="--channel-multiple must be >= 1"):
        DistillConfig(channel_multiple=0)


@pytest.fixture(scope="module")
def blocks(zoo):
    t = load_teacher(zoo["resnet_legacy"])
    sample = run_sample(t)
    return [extract(t, n, sample) for n in partition(t).neighbourhoods]


def test_width_and_lowrank_sizes_are_multiples(blocks):
    widths, ranks = [], []
    for sub in blocks:
        try:
            _, sizes = shrink(sub, 0.3, multiple=4)
        except Exception:  # noqa: BLE001 - a block with nothing to shrink
            continue
        widths += [new for old, new in sizes if new != old]
        model, factored = factor(sub, 0.3, multiple=4)
        dims = shapes(model)
        ranks += [dims[n][1] for n in dims if n.endswith("_lowrank") and len(dims[n]) > 1]
    assert widths and all(w % 4 == 0 for w in widths)
    assert ranks and all(r % 4 == 0 for r in ranks)
