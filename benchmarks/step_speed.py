"""Faster steps? One process, plain tf_keras ``fit`` on real CIFAR-10 images, side by side in one run: the
training step as Keras compiles it, with XLA (``jit_compile=True``), under the ``mixed_bfloat16`` policy (the CPU's
AVX512-BF16 / AMX when it has them), and both; each for a model and batch size.

    python benchmarks/step_speed.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz --models seed_cnn,resnet8
    python benchmarks/step_speed.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz --modes plain,bf16 \\
        --models mobilenet_v3_small,depthwise_k3_s1,depthwise_k3_s2,depthwise_k5_s1,separable_k3_s2 --name bf16_layers

Each mode trains ``--warmup`` untimed epochs (tracing, XLA compilation), then ``--epochs`` timed ones on the same
``--images`` images; rounds alternate the modes so that a noisy minute hits all of them. Prints a table of images/s
(median of the rounds) and the ratio to the plain step, and writes NAME.json and NAME.md into --out. The toolkit's
Ray path has its own step (toolkit/train/step.py); this measures whether the two switches pay at all on this CPU before
that step takes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
MODES = {"plain": (False, "float32"), "xla": (True, "float32"), "bf16": (False, "mixed_bfloat16"),
         "xla+bf16": (True, "mixed_bfloat16")}


def build(name: str):
    """A registry model, ``mobilenet_v3_small`` (keras.applications, weights=None), or ``depthwise_kK_sS`` /
    ``separable_kK_sS``: a 3x3 convolution to 32 channels, then two such layers (kernel K, stride S) with batch
    norm and ReLU, pooled into a 10-way softmax: one layer kind, timed in isolation."""
    from toolkit.models import make_model
    from toolkit.tf import import_keras

    keras = import_keras()
    if name == "mobilenet_v3_small":
        return keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=10)
    kind, _, rest = name.partition("_")
    if kind not in ("depthwise", "separable"):
        return make_model(name)
    k, s = (int(part[1:]) for part in rest.split("_"))
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(32, 3, padding="same")(inputs)
    for _ in range(2):
        x = (layers.DepthwiseConv2D(k, strides=s, padding="same", use_bias=False) if kind == "depthwise"
             else layers.SeparableConv2D(32, k, strides=s, padding="same", use_bias=False))(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    outputs = layers.Dense(10, activation="softmax", dtype="float32")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def measure(model_name: str, mode: str, x, y, batch: int, warmup: int, epochs: int) -> float:
    """Images/s of ``epochs`` epochs of model.fit in ``mode``, after ``warmup`` untimed ones."""
    from toolkit.tf import import_keras

    keras = import_keras()
    jit, policy = MODES[mode]
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = build(model_name)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                      loss="sparse_categorical_crossentropy", jit_compile=jit)
        model.fit(x, y, batch_size=batch, epochs=warmup, verbose=0)
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
        return len(x) * epochs / (time.perf_counter() - t0)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", default="seed_cnn,resnet8")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=10_240)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="step_speed")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from toolkit.tf import set_tf_env

    set_tf_env()  # tf_keras (TF_USE_LEGACY_KERAS=1) before TensorFlow is imported
    from toolkit.config import default_cache_dir
    from toolkit.data import load_dataset

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    ds = load_dataset(args.data, args.cache_dir or default_cache_dir())
    x, y = ds.x_train[:args.images], ds.y_train[:args.images]
    results: dict[str, dict[str, list[float]]] = {m: {mode: [] for mode in modes} for m in args.models.split(",")}
    for r in range(args.rounds):
        for model_name, by_mode in results.items():
            for mode in modes:
                by_mode[mode].append(measure(model_name, mode, x, y, args.batch_size, args.warmup, args.epochs))
                print(f"round {r + 1}: {model_name} {mode}: {by_mode[mode][-1]:,.0f} images/s", flush=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = platform.processor() or platform.machine()
    lines = [f"`python benchmarks/step_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({time.strftime('%Y-%m-%d')}, git {git}, {cpu}; batch {args.batch_size}, {args.images:,} images, "
             f"median of {args.rounds} rounds)", "",
             "| model | mode | images/s | vs plain |", "|---|---|---:|---:|"]
    for model_name, by_mode in results.items():
        base = statistics.median(by_mode[modes[0]])
        for mode in modes:
            med = statistics.median(by_mode[mode])
            lines.append(f"| {model_name} | {mode} | {med:,.0f} | {med / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(table + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"git": git, "args": vars(args), "images_per_s": results},
                                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
