"""What building a variant gives: :class:`VariantResult` (built and measured, skipped, or failed, with why), and
:class:`Measurement` (what the runtime measured of a built file); what a builder returns (:class:`Built`) or raises
when the variant does not apply (:class:`Skip`).

A result is made once, by the worker (export.run.worker), and never changed after: the stages that follow return
their own values (TFLite Micro's figures, the speed notes, the gate's verdict), and report.json's rows are composed
from them in one place (export.report.report_rows). A result crosses from the worker process to the pipeline as
the flat dict that is also its report row (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

STATUSES = ("ok", "skipped", "failed")


@dataclass(frozen=True)
class Measurement:
    """A built file in its runtime (export.run.context.Context.measure): top-1 accuracy and agreement with the float
    model on the full test split, latency at batch 1 and throughput at a batch, the tensors' specs, and where its
    per-image predictions are stored (a later export's --baseline reads them)."""

    accuracy: float
    agreement: float
    latency_ms_p50: float
    latency_ms_p90: float
    throughput_images_per_s: float
    throughput_batch: int
    predictions_file: str
    input: dict
    output: dict


MEASURED = tuple(f.name for f in dataclasses.fields(Measurement))


@dataclass(frozen=True)
class Built:
    """What a variant's builder returns: the file, what its runtime measured of it, and what the builder found on the
    way (export.results.VariantResult.details)."""

    path: Path
    measured: Measurement
    details: dict = field(default_factory=dict)


class Skip(Exception):
    """The variant does not apply to this model; the message says why. ``fields``: what was measured on the way, for
    the report's row (a QAT file found worse than int8 keeps its scheme, coverage and comparison)."""

    def __init__(self, reason: str, **fields: Any):
        super().__init__(reason)
        self.fields = fields


@dataclass(frozen=True)
class VariantResult:
    name: str
    format: str  # "tflite" or "onnx"
    status: str  # one of STATUSES
    reason: str = ""  # why it was skipped or failed
    path: Optional[str] = None  # the built file (in the staging folder)
    size_bytes: Optional[int] = None
    measured: Optional[Measurement] = None
    drop_pp: Optional[float] = None  # float accuracy minus this file's, in points (export.gate.stats.points)
    build_s: Optional[float] = None
    # What its builder found on the way, as the report gives it: int8's ranges, onnx_int8's route and candidates,
    # QAT's scheme and coverage (a skipped QAT keeps them too), int8_selective's float tensors and speed step.
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status: {self.status!r} is not one of {', '.join(STATUSES)}")
        if (self.status == "ok") != (self.measured is not None):
            raise ValueError(f"{self.name}: a built variant has a measurement, and only a built one")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The flat row: name, format, status, then the reason, or the file, its measurement and drop; then details."""
        row: dict[str, Any] = {"name": self.name, "format": self.format, "status": self.status}
        if not self.ok:
            return {**row, "reason": self.reason, **self.details}
        return {**row, "path": self.path, "size_bytes": self.size_bytes, **dataclasses.asdict(self.measured),
                "drop_pp": self.drop_pp, "build_s": self.build_s, **self.details}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "VariantResult":
        own = ("name", "format", "status", "reason", "path", "size_bytes", "drop_pp", "build_s")
        measured = Measurement(**{k: row[k] for k in MEASURED}) if row["status"] == "ok" else None
        return cls(**{k: row[k] for k in own if k in row}, measured=measured,
                   details={k: v for k, v in row.items() if k not in own and k not in MEASURED})
