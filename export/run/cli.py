"""The command line shared by ``python -m export``, ``python -m export.tflite`` and ``python -m export.onnx``.

Exit status: 0 every variant built and within --max-drop; 1 some variant failed or is over it (named,
one line each; the rest of the export is still written); 2 bad input (model, data, variants), with one
line and no files written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from typing import Optional, Sequence

from export.config import ExportConfig
from export.errors import ExportInputError
from export.gate.checks import POLICIES, GateConfig
from export.report import print_gate
from export.variants import FORMAT_OF, variants_of
from toolkit.data import image_size_arg
from toolkit.errors import one_line


def build_parser(formats: Sequence[str], prog: str) -> argparse.ArgumentParser:
    variants = variants_of(formats)
    d = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
         for f in dataclasses.fields(ExportConfig)}  # the defaults are the config's, never repeated here
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"Export a Keras model to {' and '.join(f.upper() if f == 'onnx' else 'TFLite' for f in formats)} "
                    "variants, run each in its device runtime on the test split, and fail if any variant's "
                    "accuracy drops more than --max-drop points below the float model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="exit status: 0 all variants within --max-drop; 1 a variant over it; 2 bad input",
    )
    p.add_argument("model", help="the float classifier: .keras (saved by Keras 2 or Keras 3), .h5, or a SavedModel "
                                 "folder; one image input (raw 0-255 pixels), one output (probabilities, logits "
                                 "or one sigmoid unit)")
    p.add_argument("--custom-objects", default=d["custom_objects"], metavar="MODULE[,MODULE]",
                   help="modules that define the model's own layers (registered with register_keras_serializable "
                        "or not): imported before the model is loaded, from the current folder too")
    p.add_argument("--data", default=None,
                   help="dataset source as for training (omit for the Keras download): calibration and "
                        "fine-tuning use its training split, evaluation its full test split")
    p.add_argument("--out", default=None, help="output folder (default: export/ next to the model)")
    p.add_argument("--variants", default=None,
                   help=f"comma list from: {', '.join(variants)} (default: all that apply to the model; named "
                        "variants must all be built)")
    p.add_argument("--max-drop", type=float, default=None,
                   help=f"largest allowed accuracy drop of any variant vs the float model, in percentage points "
                        f"(default {d['max_drop']}, or the --gate file's max_drop)")
    p.add_argument("--calibration-size", type=int, default=d["calibration_size"], help="representative images for int8 calibration")
    p.add_argument("--calibration-data", default=None,
                   help="take calibration images from this source's training split instead of --data's")
    p.add_argument("--qat-epochs", type=int, default=d["qat_epochs"], help="quantisation-aware fine-tuning epochs")
    p.add_argument("--qat-images", type=int, default=d["qat_images"], metavar="N",
                   help="fine-tune QAT on a seeded N of the training images (default: all but the held-out ones)")
    p.add_argument("--selective-steps", type=int, default=d["selective_steps"],
                   help="int8_selective: most tensors kept in float before it gives up")
    p.add_argument("--stall-timeout", type=float, default=d["stall_timeout"],
                   help="seconds without progress after which a variant's build is killed and reported failed")
    p.add_argument("--qat-build-timeout", type=float, default=d["qat_build_timeout"],
                   help="seconds tfmot may take to rebuild the model for QAT before the next scheme is tried "
                        "(it can loop forever on some graphs)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks and the converters' own output")
    p.add_argument("--latency-runs", type=int, default=d["latency_runs"], help="timed batch-1 runs per variant")
    p.add_argument("--cache-dir", default=d["cache_dir"], help="cache of decoded datasets")
    p.add_argument("--image-size", type=image_size_arg, default=None, metavar="H[xW]",
                   help="resize the data's images on load, as the model was trained (jobs/train.py --image-size)")
    p.add_argument("--resize", choices=("crop", "stretch"), default=d["resize"], help="how --image-size resizes")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert the data's images to 1 or 3 channels, as the model was trained")
    p.add_argument("--seed", type=int, default=d["seed"])
    g = p.add_argument_group("the CI gate (export.gate.checks; defaults from --gate FILE, then these)")
    g.add_argument("--baseline", default=None, metavar="PATH",
                   help="the model on the device today: a previous export folder (its stored per-image predictions) "
                        "or a model file, compared image by image on the same test images")
    g.add_argument("--gate", default=None, metavar="FILE", help="a TOML gate file committed with the model: policy, "
                   "max_regression, training_noise, class_training_noise, float_policy, alpha, max_drop, max_class_drop, "
                   "[class_floors]")
    g.add_argument("--policy", choices=POLICIES, default=None,
                   help=f"how the baseline check decides (default {GateConfig.policy}): fixed, regression (the drop "
                        "exceeds --max-regression and is significant at --alpha) or non_inferiority (the confidence "
                        "interval shows the drop is under the margin)")
    g.add_argument("--max-regression", type=float, default=None,
                   help=f"points a variant may lose against the baseline (default {GateConfig.max_regression})")
    g.add_argument("--training-noise", type=float, default=None, metavar="PP",
                   help="points a retrain of the same recipe moves accuracy beyond the test images' noise, allowed for "
                        f"by the baseline check (default {GateConfig.training_noise}, the default recipe's; 0: is "
                        "this file worse than that one; measure yours with python -m export.noise)")
    g.add_argument("--class-training-noise", type=float, default=None, metavar="PP",
                   help=f"the same for a class's recall (default {GateConfig.class_training_noise})")
    g.add_argument("--float-policy", choices=POLICIES, default=None,
                   help=f"how each variant's drift from its float model decides (default {GateConfig.float_policy})")
    g.add_argument("--alpha", type=float, default=None, help=f"significance level (default {GateConfig.alpha})")
    g.add_argument("--class-floor", action="append", default=None, metavar="CLASS=PCT",
                   help="fail a variant whose recall of CLASS is under PCT percent (repeatable)")
    g.add_argument("--max-class-drop", type=float, default=None,
                   help="fail a variant whose recall of any class is more than this many points under the baseline's, "
                        "significantly")
    g.add_argument("--junit", default=None, metavar="PATH", help="write JUnit XML, one test case per check")
    t = p.add_argument_group("device budgets (export.gate.targets; TFLite Micro's figures are measured with or without them)")
    t.add_argument("--target", action="append", default=None, metavar="NAME",
                   help="fail a TFLite variant that does not fit or run on this device (repeatable): "
                        "cortex-m4, cortex-m7, esp32-s3, phone, or one from --targets-file")
    t.add_argument("--targets-file", default=None, metavar="FILE",
                   help="a TOML file of your own device profiles, in the form of export/gate/targets.toml")
    t.add_argument("--ram-kb", type=float, default=None, help="a custom target's RAM budget for the tensor arena, KB")
    t.add_argument("--flash-kb", type=float, default=None, help="a custom target's flash budget for the file, KB")
    t.add_argument("--micro-samples", type=int, default=d["micro_samples"],
                   help="test images each TFLite variant runs in TFLite Micro, to compare with LiteRT")
    return p


def gate_config(args: argparse.Namespace) -> tuple[GateConfig, Optional[float]]:
    """(GateConfig, max_drop from the gate file or None): the --gate file, then the command line over it."""
    values: dict = {}
    if args.gate:
        try:
            with open(args.gate, "rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ExportInputError(f"--gate {args.gate}: {one_line(e)}") from None
        unknown = set(values) - {f.name for f in dataclasses.fields(GateConfig)} - {"max_drop"}
        if unknown:
            raise ExportInputError(f"--gate {args.gate}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("policy", "max_regression", "training_noise", "class_training_noise", "float_policy", "alpha",
                "max_class_drop"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    floors = dict(values.get("class_floors", {}))
    for item in args.class_floor or []:
        name, _, pct = item.rpartition("=")
        try:
            floors[name] = float(pct)
        except ValueError:
            raise ExportInputError(f"--class-floor {item}: expected CLASS=PERCENT") from None
    values["class_floors"] = floors
    max_drop = values.pop("max_drop", None)
    try:
        return GateConfig(**values), max_drop
    except (TypeError, ValueError) as e:
        raise ExportInputError(f"gate: {e}") from None


def config_from_args(args: argparse.Namespace, formats: Sequence[str]) -> ExportConfig:
    if args.variants is None:  # all of this command's formats
        variants = None if len(formats) == 2 else variants_of(formats)
        explicit = False
    else:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        explicit = True
        wrong_format = [v for v in variants if v in FORMAT_OF and FORMAT_OF[v] not in formats]
        if wrong_format:
            raise ExportInputError(f"variants: {', '.join(wrong_format)} not produced by this command "
                                   f"(use python -m export for all formats)")
    gate, gate_max_drop = gate_config(args)
    return ExportConfig(
        baseline=args.baseline, gate=gate, junit=args.junit, targets=tuple(args.target or ()),
        targets_file=args.targets_file, ram_kb=args.ram_kb, flash_kb=args.flash_kb, micro_samples=args.micro_samples,
        model=args.model, custom_objects=args.custom_objects, data=args.data, out=args.out, variants=variants,
        max_drop=args.max_drop if args.max_drop is not None else gate_max_drop if gate_max_drop is not None else
        ExportConfig.max_drop,
        calibration_size=args.calibration_size, calibration_data=args.calibration_data,
        qat_epochs=args.qat_epochs, qat_images=args.qat_images, selective_steps=args.selective_steps, latency_runs=args.latency_runs,
        stall_timeout=args.stall_timeout, qat_build_timeout=args.qat_build_timeout, cache_dir=args.cache_dir,
        image_size=args.image_size, resize=args.resize, channels=args.channels, seed=args.seed, debug=args.debug,
        explicit_variants=explicit,
    )


def main(argv: Optional[list[str]] = None, formats: Sequence[str] = ("tflite", "onnx"),
         prog: str = "python -m export") -> int:
    args = build_parser(formats, prog).parse_args(argv)
    from toolkit.data import DataError

    try:
        cfg = config_from_args(args, formats)
        from export.run.pipeline import run_export

        report = run_export(cfg, log=lambda line: print(line, flush=True))
    except (ExportInputError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # a bug of ours, not bad input: one line unless --debug
        if args.debug:
            raise
        print(f"error: export failed: {one_line(e)} (run again with --debug for the traceback)",
              file=sys.stderr, flush=True)
        return 1
    from export.gate.ci import append_step_summary, write_junit

    if cfg.junit:
        write_junit(report, cfg.junit)
    append_step_summary(report)
    return print_gate(report)
