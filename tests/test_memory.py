import platform
import pytest
from ndonnx.memory import release_freed_memory

def _rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_system():
    """Small blocks freed around a few survivors stay in glibc's heap until trimmed."""
    blocks = [bytes(1000) for _ in range(300_000)]  # ~300 MB of heap in small pieces
    survivors = blocks[::1000]
    del blocks
    before = _rss_mb()
    assert release_freed_memory()
    assert _rss_mb() < before - 100
    assert len(survivors) == 300


def _session(model_nodes, out_shape):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    model = helper.make_model(helper.make_graph(model_nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_chunked_runs_join_only_outputs_that_follow_the_samples():
    import numpy as np
    from onnx import helper

    from ndonnx.sample import run_chunked

    x = np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32)
    relu = _session([helper.make_node("Relu", ["x"], ["y"])], ["n", 3])
    np.testing.assert_array_equal(run_chunked(relu, ["y"], {"x": x}, chunk=16)[0], np.maximum(x, 0))
    flip = _session([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])], [3, "n"])  # samples last
    np.testing.assert_array_equal(run_chunked(flip, ["y"], {"x": x}, chunk=16)[0], x.T)
