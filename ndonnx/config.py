"""Settings objects: the CLI builds one, the library reads it. Small, frozen, serialisable."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PartitionConfig:
    """How a teacher is cut into neighbourhoods."""

    primary_input: str | None = None  # None: the input on whose paths the weights lie
    block_size: int = 1  # weighted segments merged into one neighbourhood (paper: 2- vs 3-layer)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            from ndonnx.errors import NdonnxError

            raise NdonnxError(f"--block-size must be >= 1, got {self.block_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleConfig:
    """The seeded sample run that records real shapes and feeds the round-trip checks."""

    seed: int = 0
    batch: int = 2  # > 1 so that batch-dependent ops are exercised
    free_dim: int = 16  # value for symbolic dims other than the batch (sequence length, ...)
    spatial_dim: int = 32  # value for symbolic trailing dims of rank-4 inputs (H, W)
