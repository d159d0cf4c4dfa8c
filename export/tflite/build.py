"""TFLite's variants, built and measured in the worker (export.run.worker): float32, dynamic, float16 and int8
from one converter call each, and int8_selective (export.tflite.int8). Each builder takes the worker's
:class:`export.run.context.Context` and the attempt to start from, and returns a :class:`export.run.context.Built`
or raises :class:`export.run.context.Skip` with the reason it does not apply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from export.results import Built
from export.tflite import int8

if TYPE_CHECKING:
    from export.run.context import Context


def build_plain_tflite(ctx: Context, attempt: int):
    """float32, dynamic, float16 and int8: one converter call each (int8's ranges then checked: int8_ranges)."""
    from export import tflite

    variant = ctx.variant
    ctx.phase(f"converting {variant}")
    path = ctx.tflite_file(variant, lambda: tflite.convert_variant(variant, ctx.source, calibration=ctx.calibration))
    extra = {"ranges": int8.int8_ranges(ctx, path)} if variant == "int8" else {}
    return Built(path, ctx.measure(path), extra)



build_int8_selective = int8.build_int8_selective
