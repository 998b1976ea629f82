"""ndonnx: compress ONNX models by Neighbourhood Distillation."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads spin while they wait for work. On a machine where another process holds a
# core, that spinning made a training step 9-45x slower with 2 threads than with 1 (a 16-channel
# residual block: 241 ms against 27 ms); passive waiting keeps it at 31 ms. libgomp reads this when it
# loads (when torch is imported), so it is set here, before any of our modules import torch; a value
# the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
