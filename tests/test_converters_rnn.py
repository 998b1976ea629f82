"""ndonnx.converters: LSTM/GRU, GlobalMaxPool, Clip with tensor bounds, and pools on small inputs.

Same contract as test_converters.py (whose one-node harness this reuses): each case gives
onnxruntime's numbers, and each replaced onnx2torch converter has cases showing the original broken.
LSTM/GRU weights must also train through ``ndonnx.trainable`` and write back into W/R/B.
"""

from typing import List

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from test_converters import (Case, CaseBook, Init, _assert_torch_matches, _build, _case_id, _run_onnxruntime,
                             assert_original_broken)

import ndonnx.converters
import onnx2torch
from ndonnx.trainable import Trainable, write_weights

OPS = {'LSTM', 'GRU', 'GlobalMaxPool', 'MaxPool', 'Clip'}  # the ops whose keys this file covers
BOOK = CaseBook(20240611)
RNG, CASES, BROKEN, add, broken, f32 = BOOK.rng, BOOK.cases, BOOK.broken_cases, BOOK.add, BOOK.broken, BOOK.f32


# ---- LSTM / GRU --------------------------------------------------------------------------------
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
GATES = {'LSTM': 4, 'GRU': 3}
DIRECTIONS = {'forward': 1, 'reverse': 1, 'bidirectional': 2}
VARIANTS = [('LSTM', {}), ('GRU', {'linear_before_reset': 0}), ('GRU', {'linear_before_reset': 1})]


def rnn_inputs(op, dirs, bias=True, states=None, batch=BATCH):
    """X, W, R[, B, sequence_lens, initial_h[, initial_c]]; states: None, 'input' or 'init'."""
    gates = GATES[op]
    inputs = [f32(SEQ, batch, INPUT), Init(f32(dirs, gates * HIDDEN, INPUT)), Init(f32(dirs, gates * HIDDEN, HIDDEN))]
    inputs.append(Init(f32(dirs, 2 * gates * HIDDEN)) if bias else None)
    if states:
        inputs.append(None)
        for _ in range(2 if op == 'LSTM' else 1):
            state = f32(dirs, batch, HIDDEN)
            inputs.append(Init(state) if states == 'init' else state)
    return inputs


def rnn_outputs(op):
    return 3 if op == 'LSTM' else 2


for op, extra in VARIANTS:
    tag = f'lbr{extra["linear_before_reset"]}_' if extra else ''
    for direction, dirs in DIRECTIONS.items():
        attrs = dict(hidden_size=HIDDEN, direction=direction, **extra)
        add(op, [7, 14, 22], rnn_inputs(op, dirs), rnn_outputs(op), name=f'{tag}{direction}', **attrs)
        add(op, [14], rnn_inputs(op, dirs, states='input'), rnn_outputs(op), name=f'{tag}{direction}_states',
            **attrs)
        add(op, [14], rnn_inputs(op, dirs, bias=False, states='input'), rnn_outputs(op),
            name=f'{tag}{direction}_states_no_bias', **attrs)
        add(op, [7], rnn_inputs(op, dirs, states='init'), rnn_outputs(op), name=f'{tag}{direction}_init_states',
            **attrs)
        add(op, [14], rnn_inputs(op, dirs, bias=False), 1, name=f'{tag}{direction}_y_only', **attrs)
    # W, R, B computed at run time; sequence_lens all full length (runtime and constant)
    gates = GATES[op]
    add(op, [14], [f32(SEQ, BATCH, INPUT), f32(2, gates * HIDDEN, INPUT), f32(2, gates * HIDDEN, HIDDEN),
                   f32(2, 2 * gates * HIDDEN)], rnn_outputs(op), name=f'{tag}runtime_weights', hidden_size=HIDDEN,
        direction='bidirectional', **extra)
    full = np.full(BATCH, SEQ, np.int32)
    add(op, [14], rnn_inputs(op, 1)[:4] + [full], 2, name=f'{tag}lens_full', hidden_size=HIDDEN, **extra)
    add(op, [14], rnn_inputs(op, 2)[:4] + [Init(full)], 2, name=f'{tag}lens_full_init', hidden_size=HIDDEN,
        direction='bidirectional', **extra)
    add(op, [14], rnn_inputs(op, 1, batch=1), rnn_outputs(op), name=f'{tag}batch1', hidden_size=HIDDEN, **extra)
    # the defaults, spelt out (any case), are accepted
    default_activations = ['Sigmoid', 'Tanh', 'Tanh'] if op == 'LSTM' else ['sigmoid', 'tanh']
    add(op, [14], rnn_inputs(op, 2), rnn_outputs(op), name=f'{tag}default_activations', hidden_size=HIDDEN,
        direction='bidirectional', activations=default_activations * 2, **extra)
add('LSTM', [14], rnn_inputs('LSTM', 2, states='input') + [Init(np.zeros((2, 3 * HIDDEN), np.float32))], 3,
    name='zero_peepholes', hidden_size=HIDDEN, direction='bidirectional')
add('LSTM', [14], rnn_inputs('LSTM', 2, states='input')[:6], 3, name='initial_h_only', hidden_size=HIDDEN,
    direction='bidirectional')

# ---- GlobalMaxPool -----------------------------------------------------------------------------
for shape in ((2, 3, 7), (2, 3, 5, 4), (1, 2, 3, 4, 5)):  # ORT has 1-3 spatial dims
    add('GlobalMaxPool', [1, 22], [f32(*shape)], name=f'{len(shape) - 2}d')

# ---- Clip (11-13: min/max inputs) --------------------------------------------------------------


def scalar(value, dtype=np.float32):
    return np.array(value, dtype)


for v in (11, 12, 13):
    x = f32(3, 4, scale=2.0)
    add('Clip', [v], [x, Init(scalar(-0.5)), Init(scalar(0.5))], name='both_init')
    add('Clip', [v], [x, Init(scalar(-0.5))], name='min_init')
    add('Clip', [v], [x], name='no_bounds')
    add('Clip', [v], [x, Init(scalar(0.0)), Init(scalar(6.0))], name='relu6')
    add('Clip', [v], [x, Init(scalar(0.5)), Init(scalar(-0.5))], name='min_above_max')
    add('Clip', [v], [x.astype(np.float16), Init(scalar(-0.3, np.float16)), scalar(0.7, np.float16)],
        name='f16_mixed')
    broken('Clip', [v], [x, None, Init(scalar(0.5))], name='absent_min')
    broken('Clip', [v], [x, scalar(-0.5), scalar(0.5)], name='runtime_both')
    broken('Clip', [v], [x, None, scalar(0.5)], name='runtime_max')
for v in (12, 13):
    ints = RNG.integers(-100, 100, (3, 4))
    broken('Clip', [v], [ints, Init(scalar(-20, np.int64)), Init(scalar(30, np.int64))], name='int64')
    broken('Clip', [v], [ints.astype(np.int32), None, scalar(7, np.int32)], name='int32_runtime_max')
    broken('Clip', [v], [ints.astype(np.int8), Init(scalar(-5, np.int8))], name='int8_min')
    add('Clip', [v], [f32(3, 4).astype(np.float64), scalar(-0.5, np.float64)], name='f64_runtime_min')

# ---- MaxPool / AveragePool on small inputs -----------------------------------------------------
# ORT sizes outputs with truncation toward zero: a window longer than the (padded) input either
# gives an empty output or, with stride > 1, one window that overhangs it; torch refuses both
SMALL = [
    ('window_over_input', (1, 2, 2, 2), dict(kernel_shape=[3, 3])),
    ('window_over_input_stride', (1, 2, 2, 2), dict(kernel_shape=[3, 3], strides=[2, 2])),
    ('valid_window_over_input', (1, 2, 2, 4), dict(kernel_shape=[3, 3], auto_pad='VALID')),
    ('window_over_one_dim', (2, 3, 1, 6), dict(kernel_shape=[2, 2], strides=[1, 2])),
]
SMALL_CEIL = [
    ('ceil_pad_tiny', (1, 2, 1, 1), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ('ceil_pad_small', (1, 2, 2, 3), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ('ceil_window_over_input', (1, 2, 2, 2), dict(kernel_shape=[3, 3], strides=[3, 3], ceil_mode=1)),
    ('ceil_1d', (1, 2, 3), dict(kernel_shape=[2], strides=[2], pads=[1, 1], ceil_mode=1)),
    ('ceil_dilated_small', (1, 2, 2, 2), dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2],
                                              pads=[1, 1, 1, 1], ceil_mode=1)),
]
for name, shape, attrs in SMALL:
    broken('MaxPool', [8, 10, 11, 12], [f32(*shape)], name=name, **attrs)
    add('MaxPool', [22], [f32(*shape)], name=name, **attrs)
    add('AveragePool', [7, 11, 19], [f32(*shape)], name=name, **attrs)
for name, shape, attrs in SMALL_CEIL:
    add('MaxPool', [10, 12, 22], [f32(*shape)], name=name, **attrs)
    add('AveragePool', [10, 19] if 'dilations' not in attrs else [19], [f32(*shape)], name=name, **attrs)
for v in (8, 10, 11, 12):
    x = f32(2, 3, 5, 6)
    add('MaxPool', [v], [x], name='plain', kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    add('MaxPool', [v], [x], name='asymmetric', kernel_shape=[3, 2], pads=[0, 1, 2, 0])
    broken('MaxPool', [v], [x], name='same_upper', kernel_shape=[3, 3], strides=[2, 2], auto_pad='SAME_UPPER')
    broken('MaxPool', [v], [f32(1, 2, 1, 1)], name='same_lower_tiny', kernel_shape=[3, 3], strides=[2, 2],
           auto_pad='SAME_LOWER')
    broken('MaxPool', [v], [x], name='pad_over_half_kernel', kernel_shape=[3, 3], pads=[2, 2, 2, 2])
for v in (10, 11, 12):
    # the last ceil_mode window may not start in the end padding (ORT); torch's rule sees no padding
    broken('MaxPool', [v], [f32(1, 2, 2, 4)], name='ceil_asymmetric_end', kernel_shape=[3, 3], strides=[2, 2],
           pads=[0, 0, 2, 2], ceil_mode=1)
    add('MaxPool', [v], [f32(1, 2, 6, 7)], name='same_dilated_stride', kernel_shape=[2, 2], strides=[3, 3],
        dilations=[2, 2], auto_pad='SAME_UPPER', ceil_mode=1)
for v in (12, 22):
    add('MaxPool', [v], [RNG.integers(-128, 128, (1, 2, 5, 5)).astype(np.int8)], name='int8_same',
        kernel_shape=[2, 2], auto_pad='SAME_LOWER')
    add('MaxPool', [v], [RNG.integers(0, 256, (1, 2, 5, 5)).astype(np.uint8)], name='uint8_pad',
        kernel_shape=[3, 3], pads=[2, 0, 1, 2], strides=[2, 1])
add('MaxPool', [12, 22], [f32(1, 2, 4, 5, 6)], name='3d_asymmetric_ceil', kernel_shape=[2, 3, 2], strides=[2, 2, 3],
    pads=[1, 0, 1, 0, 2, 1], ceil_mode=1)


# ---- harness -----------------------------------------------------------------------------------
@pytest.mark.parametrize('case', CASES, ids=[_case_id(c) for c in CASES])
def test_matches_onnxruntime(case: Case):
    model, feeds = _build(case)
    _assert_torch_matches(model, feeds, _run_onnxruntime(model, feeds))


@pytest.mark.parametrize('case', BROKEN, ids=[_case_id(c) for c in BROKEN])
def test_replaced_converter_was_broken(case: Case, monkeypatch):
    """onnx2torch's own converter fails these cases (the reason for replacing it)."""
    assert_original_broken(case, monkeypatch)


def test_every_key_of_these_ops_is_exercised():
    tested = {case.key for case in CASES}
    registered = [key for key in ndonnx.converters.REGISTERED if key[0] in OPS]
    replaced = [(r.op_type, r.version) for r in ndonnx.converters.REPLACED if r.op_type in OPS]
    assert {'LSTM', 'GRU', 'GlobalMaxPool'} <= {op for op, _ in registered}
    assert {'MaxPool', 'Clip'} <= {op for op, _ in replaced}
    assert not [key for key in registered + replaced if key not in tested]
    assert {op for op, _ in replaced} <= {case.op for case in BROKEN}


@pytest.mark.parametrize('op, extra', VARIANTS, ids=['LSTM', 'GRU-lbr0', 'GRU-lbr1'])
@pytest.mark.parametrize('direction', DIRECTIONS)
def test_rnn_layout1_is_layout0_batch_first(op, extra, direction):
    """ORT refuses layout=1, so the reference is the layout-0 model on the transposed tensors."""
    inputs = rnn_inputs(op, DIRECTIONS[direction], states='input')
    attrs = dict(hidden_size=HIDDEN, direction=direction, **extra)
    model, feeds = _build(Case(op, 14, inputs, attrs, rnn_outputs(op)))
    y, *finals = _run_onnxruntime(model, feeds)
    batch_first = {name: value.swapaxes(0, 1) for name, value in feeds.items()}  # X, initial_h, initial_c
    model, _ = _build(Case(op, 14, inputs, dict(attrs, layout=1), rnn_outputs(op)))
    expected = [y.transpose(2, 0, 1, 3)] + [f.swapaxes(0, 1) for f in finals]
    _assert_torch_matches(model, batch_first, expected)


@pytest.mark.parametrize('outputs', [['', 'y_h', 'y_c'], ['y', '', 'y_c'], ['y', 'y_h']])
def test_lstm_unused_outputs(outputs):
    """Unused outputs are empty names; the used ones are read through a node each, as in a real graph."""
    x, w, r = rnn_inputs('LSTM', 2)[:3]
    used = [o for o in outputs if o]
    graph = helper.make_graph(
        [helper.make_node('LSTM', ['x', 'w', 'r'], outputs, hidden_size=HIDDEN, direction='bidirectional')]
        + [helper.make_node('Identity', [o], [f'{o}_out']) for o in used],
        'g',
        [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, x.shape)],
        [helper.make_empty_tensor_value_info(f'{o}_out') for o in used],
        initializer=[numpy_helper.from_array(w.value, 'w'), numpy_helper.from_array(r.value, 'r')],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 14)])
    model.ir_version = 10
    _assert_torch_matches(model, {'x': x}, _run_onnxruntime(model, {'x': x}))


REFUSED = [
    ('LSTM', dict(activations=['Relu', 'Tanh', 'Tanh']), 'activations'),
    ('GRU', dict(activations=['Sigmoid', 'Relu']), 'activations'),
    ('LSTM', dict(clip=3.0), 'clip'),
    ('GRU', dict(clip=3.0), 'clip'),
    ('LSTM', dict(input_forget=1), 'input_forget'),
]


@pytest.mark.parametrize('op, attrs, message', REFUSED, ids=[f'{op}-{m}' for op, _, m in REFUSED])
def test_rnn_refuses_unsupported_attributes(op, attrs, message):
    model, _ = _build(Case(op, 14, rnn_inputs(op, 1), dict(hidden_size=HIDDEN, **attrs), rnn_outputs(op)))
    with pytest.raises(NotImplementedError, match=message):
        onnx2torch.convert(model)


def test_rnn_refuses_peepholes_and_short_sequences():
    peepholes = rnn_inputs('LSTM', 1) + [None, None, None, Init(f32(1, 3 * HIDDEN))]
    with pytest.raises(NotImplementedError, match='peepholes'):
        onnx2torch.convert(_build(Case('LSTM', 14, peepholes, dict(hidden_size=HIDDEN), 3))[0])
    lengths = np.array([SEQ, SEQ - 2, SEQ], np.int32)
    constant = rnn_inputs('GRU', 1) + [Init(lengths)]
    with pytest.raises(NotImplementedError, match='sequence_lens'):
        onnx2torch.convert(_build(Case('GRU', 14, constant, dict(hidden_size=HIDDEN), 2))[0])
    model, feeds = _build(Case('LSTM', 14, rnn_inputs('LSTM', 1) + [lengths], dict(hidden_size=HIDDEN), 3))
    module = onnx2torch.convert(model)  # known only at run time
    with pytest.raises(NotImplementedError, match='sequence_lens'):
        module(*[torch.from_numpy(a) for a in feeds.values()])


def test_max_pool_refuses_indices():
    model, _ = _build(Case('MaxPool', 12, [f32(1, 2, 4, 4)], dict(kernel_shape=[2, 2]), outputs=2))
    with pytest.raises(NotImplementedError, match='Indices'):
        onnx2torch.convert(model)


@pytest.mark.parametrize('op, extra', VARIANTS, ids=['LSTM', 'GRU-lbr0', 'GRU-lbr1'])
@pytest.mark.parametrize('direction', DIRECTIONS)
def test_rnn_weights_train_and_write_back(op, extra, direction):
    """W, R and B become parameters of the Trainable, get gradients, and trained values written back
    into the initializers give onnxruntime the trained module's numbers."""
    inputs = rnn_inputs(op, DIRECTIONS[direction], states='input')
    model, feeds = _build(Case(op, 14, inputs, dict(hidden_size=HIDDEN, direction=direction, **extra),
                               rnn_outputs(op)))
    module = Trainable(model)
    assert module.trainable == ['in1', 'in2', 'in3'] and not module.frozen
    weights = module.named_weights()
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in weights.values())

    args = [torch.from_numpy(a) for a in feeds.values()]
    sum(out.square().sum() for out in module(*args)).backward()
    for name, param in weights.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    before = _run_onnxruntime(model, feeds)
    with torch.no_grad():
        for param in weights.values():
            param.add_(torch.randn_like(param) * 0.1)
    trained = write_weights(model, module.weights())
    after = _run_onnxruntime(trained, feeds)
    with torch.no_grad():
        got = module(*args)
    for want, have, old in zip(after, got, before):
        np.testing.assert_allclose(have.numpy(), want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(want, old)  # the change reached the ONNX weights
