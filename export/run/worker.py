"""The process that builds and measures the variants, one after another, for :mod:`export.run.pipeline`.

    python -m export.run.worker JOB.json

It is a separate process so that nothing a converter or tfmot does can take the export down: an
exception fails that variant only (a result with ``status: failed`` and a one-line reason); a crash or a
hang kills this process, and the supervisor starts a new one for the variants that are left.

Progress goes to an events file, one JSON object per line, which the supervisor follows:
``start`` (a variant begins), ``attempt`` (a numbered way of building it begins, e.g. a QAT scheme),
``phase`` (what it is doing, with the seconds it may take without a sign of life), ``beat`` (alive),
``log`` (a line for the user) and ``row`` (the variant's result).
"""

from __future__ import annotations

import gzip
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from export.config import ExportConfig
from export.results import Skip, VariantResult
from export.run.context import Context, Events
from export.gate.stats import points
from toolkit.errors import one_line


def build_variant(ctx: Context, variant: str, attempt: int) -> VariantResult:
    """``variant`` built and measured, skipped, or failed with a reason."""
    from export.variants import BY_NAME

    spec = BY_NAME[variant]
    t0 = time.perf_counter()
    try:
        built = spec.build(ctx, attempt)
    except Skip as e:
        return VariantResult(variant, spec.format, "skipped", str(e), details=e.fields)
    except Exception as e:  # the point of this process: any error fails this variant only
        if ctx.config.debug:
            traceback.print_exc()
        return VariantResult(variant, spec.format, "failed", one_line(e))
    details = built.details
    if ctx.info.tfmot:  # what pruning or clustering buys on flash: zeros and repeated values compress
        details = {**details, "gzip_bytes": len(gzip.compress(built.path.read_bytes(), 9))}
    return VariantResult(variant, spec.format, "ok", path=str(built.path), size_bytes=built.path.stat().st_size,
                         measured=built.measured, drop_pp=points(ctx.float_accuracy - built.measured.accuracy),
                         build_s=time.perf_counter() - t0, details=details)


def main(argv: Optional[list[str]] = None) -> int:
    from toolkit.tf import quiet_tf_logs, set_tf_env

    set_tf_env()
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    emit = Events(job["events"])
    quiet_tf_logs()
    ctx = Context(job, ExportConfig.from_dict(job["config"]), emit)
    starts = job.get("start_attempt", {})
    for variant in job["variants"]:
        ctx.variant = variant
        emit("start", variant=variant)
        result = build_variant(ctx, variant, int(starts.get(variant, 0)))
        ctx.rows[variant] = result
        emit("row", variant=variant, row=result.to_dict())
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
