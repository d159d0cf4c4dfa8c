"""TFLite's float variants, built and measured in the worker (export.run.worker): float32, dynamic and float16,
one converter call each. The integer ones are built in export.tflite.int8. Each builder takes the worker's
:class:`export.run.context.Context` and the attempt to start from, and returns an :class:`export.results.Built`
or raises :class:`export.results.Skip` with the reason it does not apply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from export.results import Built

if TYPE_CHECKING:
    from export.run.context import Context


def build_plain_tflite(ctx: Context, attempt: int) -> Built:
    """float32, dynamic and float16: one converter call each."""
    from export import tflite

    variant = ctx.variant
    ctx.phase(f"converting {variant}")
    path = ctx.tflite_file(variant, lambda: tflite.convert_variant(variant, ctx.source, calibration=ctx.calibration))
    return Built(path, ctx.measure(path))
