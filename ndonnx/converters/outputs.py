"""Graph outputs of multi-output nodes: ``onnx2torch.convert`` returns the node's whole result.

onnx2torch indexes a multi-output node's result (a tuple) for the nodes that read one of its
outputs, but for the graph's outputs it returns each producing node's whole result, once per node.
A sub-model ending in ``Y`` of an LSTM/GRU (``Y_h`` unused), in one output of a Split or TopK, or in
two outputs of one node, then returns the wrong values and the wrong number of them; ndonnx's
neighbourhoods end in such outputs all the time. Importing this module wraps ``onnx2torch.convert``
so that the returned module gives exactly the graph's outputs, in order: each graph output that a
multi-output node produces becomes that output's item of the node's result.

A node with several outputs whose module returns a single tensor (there the choice is moot) gives
that tensor for its first output, and raises for the others when the module runs.
"""

from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import onnx
from torch import fx

import onnx2torch
import onnx2torch.converter

_ORIGINAL = getattr(onnx2torch.converter.convert, '__wrapped__', onnx2torch.converter.convert)


def node_output(result: Any, index: int) -> Any:
    """Output ``index`` of a node's result (a tuple/list, or the tensor of a single-result module)."""
    if isinstance(result, (tuple, list)):
        return result[index]
    if index == 0:
        return result
    raise NotImplementedError(f'the converted node returns one tensor, not its output {index}')


def _select_outputs(module: fx.GraphModule, graph: onnx.GraphProto) -> None:
    producers: Dict[str, Tuple[onnx.NodeProto, int]] = {}
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name:
                producers[name] = (node, index)
    names = [value.name for value in graph.output]
    if not names or any(name not in producers for name in names):
        return  # not a case onnx2torch handles at all
    if all(len(producers[name][0].output) == 1 for name in names) and len(set(names)) == len(names):
        return  # one output per producing node: onnx2torch got it right
    output = next(n for n in module.graph.nodes if n.op == 'output')
    results = output.args[0]
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    order: Dict[int, int] = {}  # id(producing node) -> its position among onnx2torch's outputs
    for name in names:
        order.setdefault(id(producers[name][0]), len(order))
    if len(order) != len(results):
        return  # not the layout this was written against: leave onnx2torch's result alone
    selected: List[fx.Node] = []
    with module.graph.inserting_before(output):
        for name in names:
            node, index = producers[name]
            result = results[order[id(node)]]
            if len(node.output) > 1:
                result = module.graph.call_function(node_output, (result, index))
            selected.append(result)
    output.args = (selected[0] if len(selected) == 1 else selected,)
    module.graph.lint()
    module.recompile()


def convert(onnx_model_or_path: Union[str, Path, onnx.ModelProto], *args, **kwargs) -> fx.GraphModule:
    module = _ORIGINAL(onnx_model_or_path, *args, **kwargs)
    model = onnx_model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    _select_outputs(module, model.graph)
    return module


convert.__doc__ = _ORIGINAL.__doc__
convert.__wrapped__ = _ORIGINAL
onnx2torch.converter.convert = convert
onnx2torch.convert = convert
