"""Partition: boundaries from the dominator chain, merging, side inputs, exact parameter sums."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndonnx.config import PartitionConfig
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import partition

RESNET_PARAMS = [224, 1168, 1168, 3632, 170]  # stem, three blocks, head (BN folded by the exporter)


def _check_chain(teacher, part):
    nb = part.neighbourhoods
    assert nb[0].inputs == (part.primary_input,)
    for a, b in zip(nb, nb[1:]):
        assert a.outputs == b.inputs
    assert sum(n.params for n in nb) + part.outside_params == teacher.params
    every = sorted(i for n in nb for i in n.nodes) + list(part.outside_nodes)
    assert sorted(every) == list(range(len(teacher.model.graph.node)))  # each node exactly once


@pytest.mark.parametrize("name", ["resnet_legacy", "resnet_dynamo", "resnet_opset11", "resnet_constants"])
def test_residual_blocks_are_neighbourhoods(zoo, name):
    t = load_teacher(zoo[name])
    part = partition(t)
    _check_chain(t, part)
    assert [n.params for n in part.neighbourhoods] == RESNET_PARAMS
    assert part.neighbourhoods[-1].outputs == ("logits",)
    assert part.outside_params == 0


def test_block_size_merges_weighted_segments(zoo):
    t = load_teacher(zoo["resnet_legacy"])
    part = partition(t, PartitionConfig(block_size=2))
    _check_chain(t, part)
    assert [n.params for n in part.neighbourhoods] == [224 + 1168, 1168 + 3632, 170]


def test_inverted_residual_and_squeeze_excite(zoo):
    t = load_teacher(zoo["mobilenet"])
    part = partition(t)
    _check_chain(t, part)
    nb = part.neighbourhoods
    assert len(nb) == 4
    assert [n.params for n in nb] == [224, 872, 1424, 90]
    se = nb[2].op_types(t.model)
    assert se["GlobalAveragePool"] == 1 and se["Conv"] == 5  # the squeeze-excite branch stays inside its block
    depthwise = [t.model.graph.node[i] for i in nb[1].nodes if t.model.graph.node[i].op_type == "Conv"]
    assert any(a.name == "group" and a.i == 32 for n in depthwise for a in n.attribute)


def test_separable_chain_pieces_hold_two_channel_mixing_ops(tmp_path):
    """A chain cut after every convolution leaves width students nothing to shrink; runs of such
    pieces are joined until each holds two channel-mixing convolutions (a real PP-OCRv4 detector's
    backbone: 12 single-conv pieces before, 3 neighbourhoods with width students after)."""
    from ndonnx.candidates import width
    from ndonnx.convert import extract
    from ndonnx.sample import run_sample

    import models

    t = load_teacher(models.separable_chain(tmp_path / "chain.onnx"))
    part = partition(t)
    _check_chain(t, part)
    s = run_sample(t)
    nodes = t.model.graph.node
    mixing = [sum(nodes[i].op_type in ("Conv", "Gemm") and all(a.name != "group" or a.i == 1 for a in nodes[i].attribute)
                  for i in n.nodes) for n in part.neighbourhoods]
    assert mixing == [2, 2, 2, 2, 1]  # stem + a pair, then two pairs each (16 pieces before); the classifier
    for n in part.neighbourhoods[:-1]:
        model, sizes = width.shrink(extract(t, n, s), 0.5)  # raises NotApplicable without an inner group
        assert sizes and all(new < old for old, new in sizes)


def test_transformer_mask_is_a_side_input(zoo):
    t = load_teacher(zoo["encoder"])
    part = partition(t)
    _check_chain(t, part)
    assert part.primary_input == "ids"  # chosen automatically: the weights lie on its paths
    nb = part.neighbourhoods
    # embedding, then attention and feed-forward sub-layers of two layers, then the head
    assert len(nb) == 6
    with_mask = [n.id for n in nb if n.side_inputs]
    assert with_mask == [1, 3]  # the two attention sub-layers read the mask path
    assert all("Softmax" in nb[i].op_types(t.model) for i in with_mask)
    assert all("Erf" in nb[i].op_types(t.model) for i in (2, 4))  # feed-forward with written-out Gelu
    # the legacy exporter shares equal LayerNorm weights between layers: tied, so outside
    assert part.outside_params == 32


def test_multi_output_model(zoo):
    t = load_teacher(zoo["two_heads"])
    part = partition(t)
    _check_chain(t, part)
    assert part.neighbourhoods[-1].outputs == ("logits", "embedding")
    assert len(part.neighbourhoods) == 3


def test_named_primary_input(zoo):
    t = load_teacher(zoo["encoder"])
    with pytest.raises(NdonnxError, match="not an input"):
        partition(t, PartitionConfig(primary_input="nope"))
    part = partition(t, PartitionConfig(primary_input="ids"))
    assert part.primary_input == "ids"


def test_no_cut_point_is_one_neighbourhood(tmp_path, caplog):
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), n) for n in ("W1", "W2"))
    g = helper.make_graph([helper.make_node("Conv", ["X", "W1"], ["A"]), helper.make_node("Conv", ["X", "W2"], ["B"])],
                          "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N", 4, 6, 6]),
                           helper.make_tensor_value_info("B", TensorProto.FLOAT, ["N", 4, 6, 6])], [w1, w2])
    path = tmp_path / "parallel.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    t = load_teacher(path)
    with caplog.at_level(logging.WARNING):
        part = partition(t)
    assert len(part.neighbourhoods) == 1 and part.neighbourhoods[0].outputs == ("A", "B")
    assert part.neighbourhoods[0].params == 216
    assert "no cut point" in caplog.text


def test_c2f_blocks_are_whole_neighbourhoods(tmp_path):
    """A boundary where a block splits or concatenates its channels fixes them: a C2f cut there keeps
    only its residual pairs' inner channels for width students. Each C2f, in the backbone's chain
    and in the piece cut from around the neck's skip, is one neighbourhood from its first 1x1 conv
    to its last, and its width student shrinks the split convolution and the concatenation too."""
    from ndonnx.candidates import width
    from ndonnx.convert import extract
    from ndonnx.sample import run_sample

    import models

    t = load_teacher(models.tiny_yolo(tmp_path / "yolo.onnx"))
    part = partition(t)
    assert sum(n.params for n in part.neighbourhoods) == t.params
    nodes = t.model.graph.node
    assert sorted([*part.outside_nodes, *(i for n in part.neighbourhoods for i in n.nodes)]) == list(range(len(nodes)))
    made = {o: i for i, n in enumerate(nodes) for o in n.output}
    where = {i: n.id for n in part.neighbourhoods for i in n.nodes}
    splits = [i for i, n in enumerate(nodes) if n.op_type == "Split"]
    assert len(splits) == 5
    s = run_sample(t)
    for i in splits:
        k = i
        while nodes[k].op_type != "Conv":  # back through SiLU (Sigmoid, Mul) to cv1
            k = made[nodes[k].input[0]]
        cat = next(j for j, n in enumerate(nodes) if n.op_type == "Concat" and nodes[i].output[0] in n.input)
        cv2 = next(j for j, n in enumerate(nodes) if n.op_type == "Conv" and nodes[cat].output[0] in n.input)
        assert where[k] == where[i] == where[cat] == where[cv2], (nodes[k].name, nodes[cv2].name)
        student, _ = width.shrink(extract(t, part.neighbourhoods[where[i]], s), 0.5)
        cv1 = next(n for n in student.graph.node if n.op_type == "Conv" and n.name == nodes[k].name)
        w = next(x for x in student.graph.initializer if x.name == cv1.input[1])
        assert w.dims[0] < next(x for x in t.model.graph.initializer if x.name == nodes[k].input[1]).dims[0]
