"""Is a model's int8 loss the calibration's luck, a few op types, or 8-bit activations themselves? One table.

    python benchmarks/int8_precision.py MODEL.keras --data DATA [--draws 4]

On the test split, against the float32 TFLite model:
- the float model under Gaussian input noise of 1 and 4 pixel levels (sd, on 0-255 pixels): how far a model's
  decisions move when its input moves by less than a JPEG re-encode. A fragile model changes a few percent of its
  answers there; int8 rounds every one of its activations to 256 steps, so it changes more.
- full int8 over ``--draws`` calibrations (``--calibration`` training images each, as the export draws them) and,
  for each, the converter's min/max ranges and the first set's 99.99th and 99.9th percentile ranges
  (export.tflite.ranges): the spread is what luck decides; for a model ending in a softmax, each also with the logits'
  range chosen for the top-1 (export.tflite.ranges.decision_range: what int8's own search tries; logits out too).
- full int8 with every op but the convolution and dense kernels in float (one draw: does the loss sit in the
  activations' own ops, as int8_selective can fix, or in the kernels?).
- TFLite's 16x8 mode (16-bit activations, 8-bit weights: integer throughout, reference kernels): if its agreement
  is near float16's, the loss is the activations' 8 bits, and no choice of int8 ranges or float ops removes it.

Each TFLite row also says on how many images its first two outputs are equal (argmax then answers the lower
class: a logits range wider than the gap between an image's first two classes ties them).

A model whose int8 agreement swings by tens of points between calibrations passes or fails a 1-point gate by luck;
this shows it in a few minutes rather than over many exports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--calibration", type=int, default=500, help="training images per calibration (the export's)")
    p.add_argument("--draws", type=int, default=4, help="calibrations, each from other training images")
    p.add_argument("--images", type=int, default=2000, help="test images to measure on")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from export.tflite import ranges
    from export.tflite.fast_int8 import KERNELS
    from export.model.load import load_source_model
    from export.ops import tflite_ops
    from export.model.predictions import class_predictions, inspect_model
    from export.runtime import TFLiteModel
    from export.tflite import convert_float16, convert_int16x8, quiet_converter
    from toolkit.errors import one_line
    from toolkit.config import default_cache_dir
    from toolkit.data import load_dataset
    from toolkit.tf import set_tf_env

    set_tf_env()
    ds = load_dataset(args.data, args.cache_dir or default_cache_dir())
    test = np.random.default_rng(0).permutation(len(ds.x_test))[:args.images]
    x, y = ds.x_test[test].astype(np.float32), ds.y_test[test]
    source = load_source_model(args.model)
    # what the output means, found as the export finds it (a model's own info says "probabilities" until then)
    kind = inspect_model(source, x[:256], ds.num_classes, f"data {args.data}").output_kind
    with quiet_converter():
        float_blob = source.tflite_converter().convert()
    float_pred = class_predictions(TFLiteModel(content=float_blob).predict(x), kind)
    float_acc = np.mean(float_pred == y)

    def row(name: str, pred: np.ndarray, ties: str = "") -> None:
        print(f"| {name} | {np.mean(pred == y) * 100:.2f}% | {(float_acc - np.mean(pred == y)) * 100:+.2f} | "
              f"{np.mean(pred == float_pred) * 100:.1f}% | {ties} |", flush=True)

    def tflite_row(name: str, blob: bytes) -> None:
        out = TFLiteModel(content=blob).predict(x)
        top = np.sort(out.reshape(len(out), -1), -1)
        # images whose first two outputs are equal: argmax sends them to the lower class
        ties = f"{np.mean(top[:, -1] == top[:, -2]) * 100:.1f}%" if top.shape[1] > 1 else "-"
        row(name, class_predictions(out, kind), ties)

    print(f"{args.model}: float32 TFLite {float_acc * 100:.2f}% on {len(y)} test images\n")
    print("| model | accuracy | drop (pp) | agrees with float32 | top-1 ties |")
    print("|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for sd in (1.0, 4.0):
        noisy = np.clip(x + rng.normal(0, sd, x.shape), 0, 255).astype(np.float32)
        row(f"float32, input noise sd {sd:g} pixel levels", class_predictions(
            TFLiteModel(content=float_blob).predict(noisy), kind))
    with quiet_converter():
        tflite_row("float16", convert_float16(source))
    first = None
    for draw in range(args.draws):
        calibration = ds.x_train[np.random.default_rng(draw).permutation(len(ds.x_train))[:args.calibration]]
        calibrated = ranges.calibrate(source.tflite_converter(), calibration)
        head = ranges.decision_range(calibrated, calibration, kind)
        first = first if first is not None else (calibration, calibrated)
        for key in ("min/max", ranges.clip_key(99.99), ranges.clip_key(99.9)):
            tflite_row(f"int8, calibration {draw}, {key} ranges",
                       ranges.quantize(ranges.clipped_as(calibrated, calibration, key), "float32"))
            if head is not None:
                tflite_row(f"int8, calibration {draw}, {key} ranges, the logits' range chosen for the top-1",
                           ranges.quantize(ranges.with_decision_range(ranges.clipped_as(calibrated, calibration, key),
                                                                      head), "float32"))
    calibration, calibrated = first
    float_ops = sorted(set(tflite_ops(content=float_blob)["ops"]) - set(KERNELS))
    tflite_row(f"int8, calibration 0, min/max, all but the kernels in float ({', '.join(float_ops)})",
               ranges.quantize(calibrated, "float32", float_ops))
    name = "16x8 (16-bit activations, int8 weights), calibration 0"
    try:
        tflite_row(name, convert_int16x8(source, calibration))
    except Exception as e:  # an op without a 16x8 kernel: say so, the table stands
        print(f"| {name}: does not convert ({one_line(e)}) | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
