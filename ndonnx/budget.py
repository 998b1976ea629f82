"""Parameter budgets: '18M', '250K', '1.5e6', '60%'. No torch: `ndonnx check` uses it in light installs."""

from __future__ import annotations

import re

from ndonnx.errors import NdonnxError


def parse_target(text: str, teacher_params: int, flag: str = "--target-params") -> int:
    """'18M', '250K', '1.5e6', '60%' (of the teacher's) -> a count; errors name `flag`."""
    t = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([kKmMgGbB%]?)", t)
    if not m:
        raise NdonnxError(f"{flag} {text!r}: expected a count like 18M, 250K, 1.5e6 or 60%")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        if not 0 < value <= 100:
            raise NdonnxError(f"{flag} {text!r}: a percentage must be in (0, 100]")
        return int(teacher_params * value / 100)
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}[unit]
    if value * scale < 1:  # no model has no parameters (or MACs): a mistake, not a budget to try
        raise NdonnxError(f"{flag} {text!r}: a budget must be at least 1")
    return int(value * scale)
