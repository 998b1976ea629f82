"""Process-wide memory settings for the processes that train (distillation jobs, fine-tuning)."""

from __future__ import annotations

import ctypes
import functools
import platform


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse in this process instead of unmapping it. Training
    allocates and frees the same large activations every step; glibc serves blocks above its mmap
    threshold (32 MB at most) from fresh mappings and unmaps them on free, so every step faulted
    and zeroed them again. On a U-Net at 128x128 (67 MB per activation at batch 64) two thirds of a
    job's CPU time went to the kernel: 20 steps took 15.6 s (11 s user, 16 s system), 7.7-8.7 s with
    this (README, "Memory"). The heap then stays at its peak until the process ends. Returns whether
    it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the free memory of glibc's heap back to the system (malloc_trim). glibc keeps what
    Python, protobuf and onnxruntime free for reuse, in pieces it does not unmap: after loading
    BERT-base (435 MB) the process held 2.2 GiB, 1.4 GiB after this; a pool worker that keeps freed
    memory (`keep_freed_memory`) holds its largest job's peak until this is called. Called between
    stages and between jobs, where what was freed will not be needed again at once. Returns whether
    it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).malloc_trim(0))
