"""Settings objects: the CLI builds one, the library reads it. Small, frozen, serialisable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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


@dataclass(frozen=True)
class DistillConfig:
    """Everything `ndonnx distill` needs besides the model and data paths."""

    partition: PartitionConfig = PartitionConfig()
    candidates: str | None = None  # None: the default set (ndonnx.candidates.DEFAULT_CANDIDATES)
    steps: int = 300  # at most: a student stops earlier when its held-out error stops falling (ndonnx.distill.job)
    min_steps: int = 50  # ... but not before this many steps
    patience: int = 50  # ... when it fell by less than min_gain over the last this many steps
    min_gain: float = 0.1
    fit_tolerance: float = 1e-3  # a student fitted to within this held-out relative MSE trains no further
    dominated: float = 2.0  # stops at min_steps: this many times the error of a sibling of no more parameters
    batch: int = 32  # per step; measured: per step of 32, about the error of a step of 64 at 0.6x the time
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    jobs: int = 0  # parallel workers; 0: one per core (CPU), one per GPU (CUDA)
    backend: str = "local"  # local: a process pool here | ray: one Ray task per neighbourhood (ndonnx.distill.backends)
    gpus_per_job: float = 1.0  # --backend ray on CUDA: the GPU share each task asks for (0.5: two per GPU)
    lookahead: int = 0
    data_free: bool = False
    data_free_method: str = "auto"  # without --data: auto | bn-stats | inversion | noise (ndonnx.synthetic)
    synthetic_count: int | None = None  # inputs the data-free method makes (None: the method's default)
    labels: str | None = None
    force: bool = False  # start anew in a run directory made for another model
    channel_multiple: int = 1  # width/lowrank sizes rounded to a multiple of this (onnxruntime's blocked kernels)

    def __post_init__(self) -> None:
        from ndonnx.errors import NdonnxError

        for name in ("steps", "batch", "min_steps", "patience"):
            if getattr(self, name) < 1:
                raise NdonnxError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_gain < 0 or self.fit_tolerance < 0 or self.dominated <= 1:
            raise NdonnxError(f"min_gain and fit_tolerance must be >= 0 and dominated > 1, got {self.min_gain}, "
                              f"{self.fit_tolerance} and {self.dominated}")
        if self.channel_multiple < 1:
            raise NdonnxError(f"--channel-multiple must be >= 1, got {self.channel_multiple}")
        if self.lookahead < 0 or self.jobs < 0 or self.lr <= 0:
            raise NdonnxError("--lookahead and --jobs must be >= 0 and --lr > 0")
        if self.backend not in ("local", "ray"):
            raise NdonnxError(f"--backend must be local or ray, got {self.backend!r}")
        if not 0 < self.gpus_per_job <= 1:
            raise NdonnxError(f"--gpus-per-job must be in (0, 1], got {self.gpus_per_job}")
        if self.gpus_per_job != 1 and self.backend != "ray":
            raise NdonnxError("--gpus-per-job applies to --backend ray (the local backend runs --jobs workers over the GPUs)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise NdonnxError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.data_free_method not in ("auto", "bn-stats", "inversion", "noise"):
            raise NdonnxError(f"--data-free-method must be auto, bn-stats, inversion or noise, "
                              f"got {self.data_free_method!r}")
        if self.synthetic_count is not None and self.synthetic_count < 2:
            raise NdonnxError(f"--synthetic-count must be >= 2, got {self.synthetic_count}")

    def to_dict(self) -> dict:
        return asdict(self)


STRATEGIES = ("greedy", "threshold")
QUANTIZE = ("int8", "int8-static", "int8-dynamic")  # ndonnx.quantize: int8 chooses by the parameter shares


@dataclass(frozen=True)
class CompressConfig:
    distill: DistillConfig = field(default_factory=DistillConfig)
    target: str = "50%"
    strategy: str = "greedy"
    max_drop: float | None = None
    refit_steps: int = 100  # after search: each chosen student refitted on the composed student's activations
    refit_samples: int = 512  # ... on this many training samples (ndonnx.recompose)
    finetune_steps: int = 0
    # measured on the bundled ResNet-20's 50% student, 3 seeds: batch 32 at 5e-5 as good as 64 at 1e-4
    # (92.90% against 92.87%) in half the time; 32 at 1e-4 lower (92.60%)
    finetune_lr: float = 5e-5
    finetune_batch: int = 32
    temperature: float = 4.0
    kd_lambda: float = 0.5  # weight of cross-entropy on labels next to the soft targets (Eq. 3)
    eval_data: str | None = None  # validate on this data (e.g. a test set) instead of the held-out split
    tolerances: str | None = None  # `ndonnx sensitivity --json` output: per-neighbourhood noise thresholds
    force: bool = False  # replace an existing output file
    target_macs: str | None = None  # a budget in MACs per sample instead of parameters ("20M", "60%")
    quantize: str | None = None  # QUANTIZE: the student to int8 after splicing and fine-tuning
    target_latency: str | None = None  # a budget in onnxruntime latency ("60%" of the teacher's, "3ms")
    latency_batch: int = 32  # the batch latency is timed at
    threads: int = 1  # onnxruntime intra-op threads latency is timed with

    @property
    def budget_text(self) -> str:
        """The budget as given, for file names and reports: '50%', '18M', '60%-macs' or '3ms-latency'."""
        if self.target_latency:
            return f"{self.target_latency}-latency"
        return f"{self.target_macs}-macs" if self.target_macs else self.target

    def __post_init__(self) -> None:
        from ndonnx.errors import NdonnxError

        if self.strategy not in STRATEGIES:
            raise NdonnxError(f"--strategy must be {' or '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.refit_steps < 0 or self.refit_samples < 1:
            raise NdonnxError(f"--refit-steps must be >= 0 and --refit-samples >= 1, got {self.refit_steps} and "
                              f"{self.refit_samples}")
        if self.finetune_batch < 1:
            raise NdonnxError(f"--finetune-batch must be >= 1, got {self.finetune_batch}")
        if not self.finetune_lr > 0:
            raise NdonnxError(f"--finetune-lr must be > 0, got {self.finetune_lr}")
        if self.finetune_steps < 0:
            raise NdonnxError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise NdonnxError(f"--quantize must be {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.tolerances is not None and self.strategy != "threshold":
            raise NdonnxError("--tolerances applies to --strategy threshold")
        from ndonnx.budget import parse_target

        parse_target(self.target, 1)  # a malformed budget is refused before any work
        if self.target_macs:
            parse_target(self.target_macs, 1, "--target-macs")
        if self.latency_batch < 1 or self.threads < 1:
            raise NdonnxError(f"--latency-batch and --threads must be >= 1, got {self.latency_batch} and {self.threads}")
        if self.target_latency is not None:
            from ndonnx.latency import parse_latency

            parse_latency(self.target_latency)
            if self.target_macs:
                raise NdonnxError("--target-latency and --target-macs are two budgets: give one")
