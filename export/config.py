"""What an export is asked to do: ``ExportConfig``, every field with why it has its default. The command
lines read their defaults from here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from export.errors import ExportInputError
from export.gate.checks import GateConfig
from export.variants import ALL_VARIANTS, variants_problem
from toolkit.config import default_cache_dir


@dataclass
class ExportConfig:
    model: str  # the float model: .keras (Keras 2 or 3), .h5, or a SavedModel folder
    # Modules (comma list) defining the model's own layers, imported before it is loaded (toolkit.custom);
    # the same option as training's.
    custom_objects: str = ""
    # Same sources as training; calibration images come from its training split, evaluation
    # uses its full test split. None = the Keras download.
    data: Optional[str] = None
    # Output folder; None = "export/" next to the model.
    out: Optional[str] = None
    # None = every variant that applies (a variant that does not apply, such as QAT of a Keras 3
    # model, is skipped with its reason). Named variants must all be built, or the export fails.
    variants: Optional[tuple[str, ...]] = None
    # Whether ``variants`` was named by the user (None: named when given). ``python -m export.tflite``
    # passes its own format's variants as a default, not as a demand.
    explicit_variants: Optional[bool] = None
    # Largest allowed top-1 accuracy drop of any variant against the float model, in points.
    max_drop: float = 1.0
    # Representative images for int8 calibration: 500 covers CIFAR-10's classes many times over;
    # more adds conversion time, not accuracy (see docs/export.md).
    calibration_size: int = 500
    # A different source for calibration images (its training split), e.g. device-domain images.
    calibration_data: Optional[str] = None
    # Quantisation-aware fine-tuning epochs over the training split, at a small step: the float
    # weights are already good, QAT only adapts them to 8-bit rounding.
    qat_epochs: int = 2
    qat_learning_rate: float = 1e-4
    # A seeded share of the training images QAT fine-tunes on (None: all but the held-out ones). QAT adapts
    # trained weights to 8-bit rounding and needs steps more than images (QAT_MIN_STEPS); on a large set an
    # epoch of all of it is the export's longest step (seed_cnn, CIFAR-10's 45,000: 48 of the export's 73 s).
    qat_images: Optional[int] = None
    # int8_selective: at most this many tensors kept in float before giving up.
    selective_steps: int = 8
    # Held-out images from the training split (never the test split) that QAT's divergence check
    # and int8_selective's search measure on: 2,000 resolve a 1-point drop to +-0.5 points.
    holdout_size: int = 2000
    # Latency: batch-1 runs after warm-up, on one thread, as on a phone's single big core.
    latency_runs: int = 200
    latency_threads: int = 1
    throughput_batch: int = 64
    # A variant whose worker shows no sign of life this long is killed (converters can hang);
    # tfmot's graph rebuild gets its own, shorter limit (it takes seconds, or loops forever).
    stall_timeout: float = 900.0
    qat_build_timeout: float = 120.0
    cache_dir: str = field(default_factory=default_cache_dir)
    # The data as the model was trained on it (jobs/train.py's --image-size, --resize, --channels).
    image_size: Optional[tuple[int, int]] = None
    resize: str = "crop"
    channels: Optional[int] = None
    seed: int = 0
    # Tracebacks of failed variants, and the worker's raw output, on stderr.
    debug: bool = False
    # The model on the device today: a previous export folder (its stored predictions) or a model file,
    # compared image by image on the same test split (export.gate.checks, export.gate.baseline).
    baseline: Optional[str] = None
    # How every check decides (policies, margins, class floors): export.gate.checks.GateConfig, from --gate FILE
    # (TOML) and the command line.
    gate: GateConfig = field(default_factory=GateConfig)
    # JUnit XML with one test case per check, for CI's test reporters.
    junit: Optional[str] = None
    # Devices to check each TFLite variant against (export.gate.targets: names from targets.toml or
    # targets_file, and "custom" from ram_kb/flash_kb): a variant that does not fit or run there fails.
    # With none, TFLite Micro's figures are still measured and reported.
    targets: tuple[str, ...] = ()
    targets_file: Optional[str] = None
    ram_kb: Optional[float] = None
    flash_kb: Optional[float] = None
    # Test images each variant runs in TFLite Micro, one at a time, to compare with LiteRT: its reference
    # kernels take about 5 ms per 32x32 image of the default model, so 300 cost under 2 s a variant and
    # resolve a disagreement rate of 1% to about +-0.6 points. 0: none run (the arena is still measured).
    micro_samples: int = 300

    def __post_init__(self) -> None:
        if self.variants is not None:
            self.variants = tuple(self.variants)
            problem = variants_problem(self.variants)
            if problem:
                raise ExportInputError(f"variants: {problem}")
        if self.max_drop < 0:
            raise ExportInputError(f"max_drop: must be >= 0, got {self.max_drop}")
        self.targets = tuple(self.targets)
        if self.micro_samples < 0:
            raise ExportInputError(f"micro_samples: must be >= 0, got {self.micro_samples}")
        for name in ("ram_kb", "flash_kb"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ExportInputError(f"{name}: must be > 0 KB, got {getattr(self, name)}")
        self.device_targets()  # an unknown name or a bad profile file: one line, before any work
        for name in ("calibration_size", "latency_runs", "selective_steps", "holdout_size"):
            if getattr(self, name) < 1:
                raise ExportInputError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if "qat_int8" in self.requested and self.qat_epochs < 1:
            raise ExportInputError(f"qat_epochs: must be >= 1, got {self.qat_epochs}")
        if self.qat_images is not None and self.qat_images < 1:
            raise ExportInputError(f"qat_images: must be >= 1, got {self.qat_images}")

    @property
    def requested(self) -> tuple[str, ...]:
        """The variants to build, in report order."""
        return tuple(v for v in ALL_VARIANTS if self.variants is None or v in self.variants)

    @property
    def explicit(self) -> tuple[str, ...]:
        """The variants the user named (these must be built)."""
        named = self.variants is not None if self.explicit_variants is None else self.explicit_variants
        return self.requested if named else ()

    def device_targets(self) -> list:
        """The export.gate.targets.Target profiles asked for (--target, --targets-file, --ram-kb/--flash-kb)."""
        from export.gate.targets import resolve_targets

        return resolve_targets(self.targets, self.targets_file, self.ram_kb, self.flash_kb)

    @property
    def image_spec(self):
        """How the data is decoded, as training decoded it (as TrainConfig.image_spec)."""
        from toolkit.data import ImageSpec

        return ImageSpec(self.image_size, self.resize, self.channels)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.model).resolve().parent / "export"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportConfig":
        """The config ``to_dict`` wrote (as the export's worker process reads it from its job file)."""
        return cls(**{**d, "gate": GateConfig(**d["gate"]),
                      "image_size": tuple(d["image_size"]) if d.get("image_size") else None})
