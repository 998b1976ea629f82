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
