"""The one typed configuration object for a training run.

Every value has a default chosen by measurement (see docs/training.md, "Why the defaults are what they are") and a
comment saying why. The config travels with every artifact: it is written into each Ray
Train checkpoint and into ``metrics.json`` so a model always says how it was made.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


def default_cache_dir() -> str:
    """Where decoded datasets are cached: ``$XDG_CACHE_HOME`` or ``~/.cache`` (never the data folder,
    which may be read-only)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "keras-edge-toolkit")


GRAD_DTYPES = ("float32", "float16", "bfloat16")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "exponential")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    # --- data -----------------------------------------------------------------------------
    # None = the Keras download (as in the tutorial); otherwise a path to a local copy:
    # cifar-10-batches-py/ folder or cifar-10-python.tar.gz, or a train/ test/ class-folder
    # tree, as a folder or a .tar/.tar.gz of one.
    data: Optional[str] = None
    # Decoded uint8 arrays are cached here so the second load is a fraction of the first.
    cache_dir: str = field(default_factory=default_cache_dir)
    # Fraction of the training split held out for validation: model selection and early
    # stopping look only at it, never at the test split.
    val_fraction: float = 0.1
    # (height, width) every image is resized to on load; None = as stored (one size for all images).
    image_size: Optional[tuple[int, int]] = None
    # How --image-size resizes: "crop" (shorter side to size, centre crop: keeps the aspect ratio, as
    # Keras' image_dataset_from_directory(crop_to_aspect_ratio=True)) or "stretch" (plain resize).
    resize: str = "crop"
    # 1 or 3: convert every image to grayscale or RGB (RGBA, palette, ...); None = as stored.
    channels: Optional[int] = None
    # "balanced": weight each training image by total / (classes x its class's count), so a skewed set
    # does not teach the model to predict the majority class; None = every image counts the same.
    class_weights: Optional[str] = None
    # How images reach the workers: "memory" decodes everything on the driver once (cached) and ships
    # arrays (fastest while they fit); "stream" has Ray Data read and decode the files in parallel
    # tasks and stream each worker its shard (a class-folder tree, local or s3://); "auto" streams
    # when the decoded arrays would exceed memory_budget.
    ingest: str = "auto"
    # Fraction of this machine's memory the decoded arrays may take before "auto" streams. A quarter
    # leaves room for the object store's copy, the workers' pipelines and evaluation.
    memory_budget: float = 0.25
    # Random crop after 4-pixel padding plus horizontal flip: the tutorial's own suggested
    # improvement; it is what takes seed_cnn past its ~68% over-fitting ceiling.
    augment: bool = True

    # --- model and optimiser --------------------------------------------------------------
    # A registry name (toolkit.models.MODELS; seed_cnn is the tutorial's network), a saved Keras 2
    # model (path/to/model.keras) to fine-tune, or a factory package.module:function(input_shape, num_classes).
    model: str = "seed_cnn"
    # Modules (comma list) that define the model's own layers, imported before a saved model is loaded
    # (toolkit.custom): Keras finds a registered layer only once its module is imported. Empty: none.
    custom_objects: str = ""
    # 30 epochs as in the tutorial; with augmentation the validation accuracy still rises
    # at 30, so more would help a little, at proportionally more time.
    epochs: int = 30
    # Global batch, split evenly across workers. The tutorial's 32 is communication-bound
    # once split (about 1,200 images/s on 2 workers vs about 6,500 at 256).
    batch_size: int = 256
    # The defaults are the "fast" recipe (toolkit/train/recipes.py), chosen by a side-by-side run of 30 epochs on the
    # full split (benchmarks/results/recipes_30.md): 76.15% test accuracy and 70% validation at epoch 10, where
    # the previous defaults (Adam 2e-3, constant: the "adam" recipe) gave 73.83% and reached 70% at epoch 14.
    # The step for the global batch (the schedule's peak): 0.05 for seed_cnn, which has no batch norm (0.02 and
    # 0.2 learned less in 6 epochs, toolkit/train/recipes.py).
    learning_rate: float = 0.05
    # Named training choices (toolkit.train.recipes, jobs/train.py --recipe): None = the fields as they stand here.
    # Recorded with the run, so a model says how it was made.
    recipe: Optional[str] = None
    # "sgd" (with Nesterov momentum 0.9: fast CIFAR-10 training's) or "adam" (the tutorial's).
    optimizer: str = "sgd"
    momentum: float = 0.9
    # The learning rate over the run: "constant"; "cosine" (linear warm-up over warmup_epochs, at most a third of
    # the run, then cosine decay to zero at the last epoch); "exponential" (times decay_per_epoch after every
    # epoch: MLPerf Tiny's).
    schedule: str = "cosine"
    warmup_epochs: float = 2.0
    decay_per_epoch: float = 0.99
    # Decoupled weight decay (the optimizer's own, scaled by the learning rate); 0 = none, as the tutorial.
    weight_decay: float = 5e-4
    # Cross-entropy against targets smoothed by this much; 0 = the tutorial's hard targets.
    label_smoothing: float = 0.1
    # The dtype layers compute in (variables stay float32: Keras's mixed precision). "auto": bfloat16 on a CPU that
    # computes it natively (AVX512-BF16 or AMX; decided on each worker), float32 elsewhere. On this machine's AMD
    # EPYC one tf_keras process trained seed_cnn 1.97x and resnet8 1.86x faster in bfloat16, while XLA
    # (jit_compile) ran them at 0.53x and 0.46x (benchmarks/results/step_speed.md), so XLA is not an option.
    compute_dtype: str = "auto"
    # Stop when validation accuracy has not improved for this many epochs (0 = never).
    # The best-validation weights are restored either way.
    patience: int = 0
    seed: int = 0

    # --- Ray: layout ----------------------------------------------------------------------
    # None = auto: one worker per Ray node, owning all of that node's CPUs (or GPUs). Measured
    # (benchmarks/scaling.py, benchmarks/results/scaling.md): on one 2-core machine, 1 worker x 2 CPUs
    # trains at about plain Keras's speed while 2 workers x 1 CPU reach 0.93x of it; inside a node, threads share
    # memory for free, while workers pay an all-reduce every step. An int overrides.
    num_workers: Optional[int] = None
    use_gpu: bool = False
    # None = auto: the node's CPUs divided by the workers placed on it. TensorFlow's thread
    # pools are sized from it (Ray pins OMP_NUM_THREADS=1 and does not pin cores).
    cpus_per_worker: Optional[int] = None

    # --- Ray: gradient synchronisation -------------------------------------------------------
    # Workers add up K micro-batches' gradients before one all-reduce: the global batch is
    # computed as workers x K micro-batches of batch_size / (workers x K), so the learning rate
    # keeps its meaning and the all-reduce count per image falls K-fold. 1 = every step.
    accumulate_steps: int = 1
    # Gradients on the wire: float16/bfloat16 halve the all-reduce's bytes (summed in that
    # dtype, applied in float32). float32 by default: on the machines measured the all-reduce
    # is latency-, not bandwidth-bound for models this size (docs/results.md, scaling table).
    grad_dtype: str = "float32"
    # All-reduce packing (tf.distribute CommunicationOptions.bytes_per_pack): 0 = all gradients
    # in one message, which is what a small model wants; larger models may overlap packs.
    bytes_per_pack: int = 0
    # Training steps per tf.function call: fewer Python round trips between steps. 4 measured
    # 3-6% faster than 1 for the default layout on the 2-core machine (benchmarks/scaling.py).
    steps_per_execution: int = 4
    # Read every metric's result every step, as Keras does: under MultiWorkerMirroredStrategy
    # each read is a cross-worker all-reduce. Off: steps accumulate metric states and results are
    # read once per epoch (same numbers; the scaling benchmark's "before" rows measure the cost).
    step_metrics: bool = False
    # After training, time this many steps of each part (compute, all-reduce, input) on every
    # worker and write the breakdown into metrics.json (0 = off; the scaling benchmark sets it).
    profile_steps: int = 0

    # Seconds to wait for the cluster to offer what the run asks (workers x CPUs/GPUs) before
    # stopping with one line (exit 2); 0 = wait forever, for clusters whose autoscaler adds nodes.
    # A minute covers a replacement node joining; Ray itself would wait forever, silently.
    resource_timeout: float = 60.0
    # Ray Train run name: the same name and storage path resume an interrupted run.
    name: Optional[str] = None
    # Where Ray Train keeps runs and checkpoints: a local folder, a shared mount (NFS), or an object
    # store (s3://bucket/prefix). A multi-node run needs one every node reaches.
    storage_path: Optional[str] = None
    # S3-compatible endpoint for s3:// locations (MinIO, Ceph, ...); None = AWS_ENDPOINT_URL_S3 /
    # AWS_ENDPOINT_URL, else AWS itself. Credentials come from the standard AWS variables.
    s3_endpoint: Optional[str] = None
    # Checkpoints kept per run; each is the full model (about 4 MB for seed_cnn).
    keep_checkpoints: int = 3
    # Whole-group restarts after a worker dies, each resuming from the latest checkpoint.
    max_failures: int = 3

    # --- outputs --------------------------------------------------------------------------
    # A local folder or an object-store prefix (s3://...): written locally, uploaded at the end.
    output: str = "out"
    # Run the edge export (TFLite/ONNX variants and the drift report) after training.
    export: bool = True
    # Export gate: the largest allowed accuracy drop of any edge variant, in points.
    max_drop: float = 1.0
    # Quantisation-aware fine-tuning epochs in the export (qat_int8 variant).
    qat_epochs: int = 2
    # The export's variants, comma-separated (None: every variant, as python -m export builds them).
    export_variants: Optional[str] = None
    # Use only this many training/test images (None = all); for smoke tests.
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if self.image_size is not None:
            self.image_size = tuple(int(d) for d in self.image_size)  # a JSON list from a checkpoint
        if self.ingest not in ("memory", "stream", "auto"):
            raise ValueError(f"ingest must be memory, stream or auto, got {self.ingest!r}")
        if not 0.0 < self.memory_budget <= 1.0:
            raise ValueError(f"memory_budget must be a fraction of memory in (0, 1], got {self.memory_budget}")
        if self.class_weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be 'balanced' or None, got {self.class_weights!r}")
        from toolkit.data import ImageSpec

        ImageSpec(self.image_size, self.resize, self.channels)  # raises ValueError naming the bad value
        from toolkit.models import model_kind

        model_kind(self.model)  # a ModelError (ValueError) for a value that is none of the three forms
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (or None for one per node), got {self.num_workers}")
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {self.accumulate_steps}")
        if self.num_workers is not None:
            self.check_batch_split(self.num_workers)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {self.grad_dtype!r}")
        if self.bytes_per_pack < 0:
            raise ValueError(f"bytes_per_pack must be >= 0, got {self.bytes_per_pack}")
        if self.steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be >= 1, got {self.steps_per_execution}")
        if self.resource_timeout < 0:
            raise ValueError(f"resource_timeout must be >= 0, got {self.resource_timeout}")
        if self.profile_steps < 0:
            raise ValueError(f"profile_steps must be >= 0, got {self.profile_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"weight_decay and warmup_epochs must be >= 0 and momentum in [0, 1), got "
                             f"{self.weight_decay}, {self.warmup_epochs}, {self.momentum}")
        if not 0.0 < self.decay_per_epoch <= 1.0:
            raise ValueError(f"decay_per_epoch must be in (0, 1], got {self.decay_per_epoch}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    @property
    def image_spec(self):
        from toolkit.data import ImageSpec

        return ImageSpec(self.image_size, self.resize, self.channels)

    def check_batch_split(self, num_workers: int) -> None:
        """The global batch must split evenly into workers x accumulate_steps micro-batches."""
        parts = num_workers * self.accumulate_steps
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_workers x accumulate_steps "
                f"({num_workers} x {self.accumulate_steps}): the global batch is split evenly into micro-batches"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
