"""What keeping each op type in float does to a full-integer int8 model: accuracy and agreement with the float32
TFLite model on test images, and batch-1 latency in LiteRT (one thread, median of --runs) against float32's, for
no op type, each type alone, the two activation types together (swish is LOGISTIC + MUL), everything but the
convolution and dense kernels, and each --together list.

    python benchmarks/op_types_in_float.py MODEL.keras --data ../shared/data/cifar10/cifar10-jpeg.tar.gz \
        [--together HARD_SWISH,MUL ...]

The latency column asks whether int8 is slow because of ops LiteRT's XNNPACK delegate does not run in int8 (the
export's speed note names them): kept in float, they run in the delegate between int8 kernels.

int8_selective (export/tflite/selective.py) asks the same question on held-out training images, one denylist at a
time; this prints the whole table on the test split, to see whether a model's int8 loss sits in some op types
(keeping them in float restores agreement) or in every op of a fragile model (nothing short of float32 does).
Calibration is ``--calibration`` training images (the export's default count), re-quantised with each denylist
without a new calibration, as int8_selective does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def denylists(ops: dict[str, list[str]], together: tuple = ()) -> dict[str, list[str]]:
    """The denylists to measure, by name; ``together``: more lists of op types, each kept in float at once."""
    from export.tflite.fast_int8 import KERNELS

    out = {"none (full int8)": []}
    out.update({f"{op} ({len(ts)})": ts for op, ts in sorted(ops.items(), key=lambda kv: -len(kv[1]))})
    combined = {"LOGISTIC + MUL": ops.get("LOGISTIC", []) + ops.get("MUL", []),
                "all but the kernels": [t for op, ts in ops.items() if op not in KERNELS for t in ts]}
    combined.update({" + ".join(t.split(",")): [n for op in t.split(",") for n in ops.get(op, [])] for t in together})
    out.update({name: keep for name, keep in combined.items() if keep})  # a model without swish has no swish row
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--calibration", type=int, default=200, help="training images to calibrate on")
    p.add_argument("--images", type=int, default=2000, help="test images to measure on")
    p.add_argument("--together", action="append", default=[], metavar="OP,OP",
                   help="op types kept in float at once, one more row (repeatable)")
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 runs per row")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from export.model.load import load_source_model
    from export.model.predictions import class_predictions
    from export.runtime import TFLiteModel
    from export.tflite.selective import debugger_rows, requantize, tensors_by_op_type
    from export.tflite import quiet_converter, representative_dataset
    from toolkit.config import default_cache_dir
    from toolkit.data import load_dataset
    from toolkit.tf import import_tf, set_tf_env
    from toolkit.timing import time_calls

    set_tf_env()
    tf = import_tf()
    ds = load_dataset(args.data, args.cache_dir or default_cache_dir())
    rng = np.random.default_rng(0)
    calibration = ds.x_train[rng.permutation(len(ds.x_train))[:args.calibration]]
    test = rng.permutation(len(ds.x_test))[:args.images]
    x, y = ds.x_test[test], ds.y_test[test]
    source = load_source_model(args.model)
    with quiet_converter():
        float_blob = source.tflite_converter().convert()
        converter = source.tflite_converter()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(calibration)
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative_dataset(calibration[:16]))
        debugger.run()
    kind = source.info.output_kind
    float_pred = class_predictions(TFLiteModel(content=float_blob).predict(x), kind)
    ops = tensors_by_op_type(debugger_rows(debugger), exclude=[])
    def p50_ms(blob: bytes) -> float:
        model = TFLiteModel(content=blob, num_threads=1)
        one = model.prepare(x[:1])
        return float(np.median(time_calls(lambda: model.run(one), runs=args.runs, warmup=30)))

    float_ms = p50_ms(float_blob)
    print(f"{args.model}: float32 TFLite {np.mean(float_pred == y) * 100:.2f}% on {len(y)} test images, batch-1 p50 "
          f"{float_ms:.4f} ms\n")
    print("| kept in float | tensors | accuracy | drop (pp) | agrees with float32 | p50 ms | ÷ float32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, keep in denylists(ops, tuple(args.together)).items():
        blob = requantize(debugger, keep)
        pred = class_predictions(TFLiteModel(content=blob).predict(x), kind)
        drop = (np.mean(float_pred == y) - np.mean(pred == y)) * 100
        agree = np.mean(pred == float_pred) * 100
        ms = p50_ms(blob)
        print(f"| {name} | {len(keep)} | {np.mean(pred == y) * 100:.2f}% | {drop:+.2f} | {agree:.1f}% | {ms:.4f} | "
              f"{ms / float_ms:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
