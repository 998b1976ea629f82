"""Writing files so that none ever half exists: everything goes to a temporary name beside its
target and is renamed onto it (atomic on one filesystem). No torch: the light CI install uses it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ndonnx.errors import NdonnxError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it
    fails; the target is left as it was. A full disk or a read-only folder is a one-line error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # same suffix: savers that append one keep it
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise NdonnxError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file and of the `<name>.data` beside it (weights stored externally)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
