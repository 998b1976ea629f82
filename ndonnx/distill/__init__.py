"""Distillation: the activation cache, self-contained jobs, and the runner that executes them."""
