"""Seeded fuzzing of real exported models and data files through the loader and the CLI:
no traceback, and the documented exit code, every time."""

from __future__ import annotations

import numpy as np
import pytest

from ndonnx_cli.main import main

CASES = 24


def _mutations(data: bytes, seed: int):
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    kind = seed % 3
    if kind == 0:  # truncate
        return bytes(b[: int(rng.integers(1, len(b)))])
    if kind == 1:  # flip a few bytes
        for i in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
            b[i] ^= int(rng.integers(1, 256))
        return bytes(b)
    i = int(rng.integers(0, len(b) - 64))  # overwrite a run with noise
    b[i:i + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    return bytes(b)


@pytest.mark.parametrize("seed", range(CASES))
def test_corrupt_model(zoo, tmp_path, capsys, seed):
    path = tmp_path / "m.onnx"
    path.write_bytes(_mutations(zoo["resnet_legacy"].read_bytes(), seed))
    code = main(["inspect", str(path), "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code in (0, 2), err  # a flip inside weight data can leave a valid model
    if code == 2:
        lines = err.strip().splitlines()
        assert lines[-1].startswith("ndonnx: error:") and len([l for l in lines if "error" in l]) == 1


@pytest.mark.parametrize("seed", range(8))
def test_corrupt_data(zoo, tmp_path, capsys, seed):
    good = tmp_path / "good.npz"
    np.savez(good, input=np.random.default_rng(seed).standard_normal((4, 3, 16, 16)).astype(np.float32))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(_mutations(good.read_bytes(), seed))
    code = main(["check", str(zoo["resnet_legacy"]), "--reference", str(zoo["resnet_legacy"]), "--data", str(bad),
                 "--max-rel-err", "1e-3"])
    err = capsys.readouterr().err
    assert code == 2, err  # every mutation here breaks the zip (CRC or structure): a usage error
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(f"ndonnx: error: {bad}: is not a readable .npz file ("), err
