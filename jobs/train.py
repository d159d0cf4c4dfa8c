"""Train a Keras CNN on CIFAR-10 with Ray Train, then write the model, metrics and plots.

    python jobs/train.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz       # local Ray
    ray job submit --working-dir . -- python jobs/train.py --data /path/on/cluster  # a cluster

Data flows one way: load (cached) -> Ray Train workers -> best-validation model -> test-split
evaluation in this driver -> files in --output (-> edge export, unless --no-export).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    import toolkit  # noqa: F401  (installed: pip install -e .)
except ImportError:  # a plain checkout, say a Ray job's working dir without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import COMPUTE_DTYPES, GRAD_DTYPES, TrainConfig  # noqa: E402
from toolkit.data import image_size_arg  # noqa: E402

# Streamed data is exported on a decoded sample of this many train and test images: enough for int8
# calibration, QAT and an accuracy estimate within a fraction of a point, small enough for memory.
EXPORT_SAMPLE = 10_000

# What --smoke-test changes: a seconds-long run through every stage, for tests and first tries. The export
# gate keeps its real budget (--max-drop 1.0): measured on the smoke model (2 epochs, 33% test accuracy on
# 2,048 images), every variant stayed within 0.3 points of it and QAT gained 5.6, so a gate that fails
# there has found a real conversion fault, not noise.

SMOKE_TEST = {"epochs": 2, "limit": 2048, "batch_size": 64, "qat_epochs": 1}


def _auto_int(value: str) -> int | None:
    """'auto' -> None (resolved from the cluster), else a positive int."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="jobs/train.py",
        description="Data-parallel training of a Keras CNN on CIFAR-10 with Ray Train "
                    "(MultiWorkerMirroredStrategy), writing model.keras, metrics.json, history.json and plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="dataset source: omit for the Keras download; or a cifar-10-batches-py/ folder, "
                        "cifar-10-python.tar.gz, or a train/<class>/ [val/<class>/] test/<class>/ image tree (folder, "
                        ".tar, .tar.gz, or s3://bucket/prefix/ with the AWS_* variables or --s3-endpoint)")
    g.add_argument("--cache-dir", default=d["cache_dir"].default_factory(), help="cache of decoded arrays")
    g.add_argument("--image-size", type=image_size_arg, default=None, metavar="H[xW]",
                   help="resize every image to H x W on load (default: as stored; all images must then share one "
                        "size); the model is built for the data's shape")
    g.add_argument("--resize", choices=("crop", "stretch"), default=d["resize"].default,
                   help="how --image-size resizes: crop = shorter side to size then centre crop (keeps the aspect "
                        "ratio); stretch = plain resize")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert images to 1 (grayscale) or 3 (RGB) channels, RGBA and palette images included "
                        "(default: as stored)")
    g.add_argument("--ingest", choices=("memory", "stream", "auto"), default=d["ingest"].default,
                   help="memory: decode every image on the driver (cached) and ship arrays; stream: Ray Data reads "
                        "and decodes a class-folder tree (folder or s3://) in parallel and streams each worker its "
                        "shard; auto: stream when the decoded arrays exceed --memory-budget")
    g.add_argument("--memory-budget", type=float, default=d["memory_budget"].default,
                   help="fraction of this machine's memory the decoded arrays may take before --ingest auto streams")
    g.add_argument("--class-weights", choices=("balanced",), default=None,
                   help="balanced: weight training images inversely to their class's count (skewed datasets)")
    g.add_argument("--val-fraction", type=float, default=d["val_fraction"].default,
                   help="fraction of the training split held out for validation")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d["augment"].default,
                   help="random crop (4-pixel padding) and horizontal flip")
    g = p.add_argument_group("model and optimiser")
    from toolkit.models import MODELS

    g.add_argument("--model", default=d["model"].default,
                   help=f"a registered model ({', '.join(sorted(MODELS))}); a saved Keras 2 model to fine-tune "
                        "(path/to/model.keras or .h5); or a factory package.module:function, called as "
                        "function(input_shape, num_classes) and importable on the workers")
    g.add_argument("--custom-objects", default=d["custom_objects"].default, metavar="MODULE[,MODULE]",
                   help="modules that define the model's own layers (a saved --model's, and the export's): "
                        "imported before loading, from the current folder too")
    g.add_argument("--epochs", type=int, default=d["epochs"].default)
    g.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="global batch size, split evenly across workers")
    g.add_argument("--learning-rate", type=float, default=d["learning_rate"].default,
                   help="the step for the global batch (the schedule's peak), whatever the worker layout")
    from toolkit.config import OPTIMIZERS, SCHEDULES
    from toolkit.train.recipes import RECIPES

    g.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="a named set of training choices (toolkit/train/recipes.py); options given here override it")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"].default)
    g.add_argument("--momentum", type=float, default=d["momentum"].default, help="SGD's Nesterov momentum")
    g.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"].default,
                   help="cosine: linear warm-up over --warmup-epochs, then cosine decay to zero; exponential: times "
                        "--decay-per-epoch after every epoch")
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"].default)
    g.add_argument("--decay-per-epoch", type=float, default=d["decay_per_epoch"].default)
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"].default, help="decoupled weight decay")
    g.add_argument("--label-smoothing", type=float, default=d["label_smoothing"].default)
    g.add_argument("--patience", type=int, default=d["patience"].default,
                   help="early stopping: epochs without validation improvement (0 = off)")
    g.add_argument("--seed", type=int, default=d["seed"].default)
    g = p.add_argument_group("Ray")
    g.add_argument("--num-workers", type=_auto_int, default="auto",
                   help="Ray Train workers; auto = one per node (per GPU node with --use-gpu): on one machine, "
                        "one worker with every core (0.96x plain Keras in benchmarks/results/scaling.md)")
    g.add_argument("--use-gpu", action="store_true",
                   help="train on GPUs: each worker gets its node's GPUs (MultiWorkerMirroredStrategy mirrors "
                        "over them) unless --num-workers asks for more workers per node")
    g.add_argument("--cpus-per-worker", type=_auto_int, default="auto",
                   help="CPUs reserved per worker (TensorFlow's thread count); auto = the node's CPUs "
                        "shared by the workers on it")
    g.add_argument("--resource-timeout", type=float, default=d["resource_timeout"].default,
                   help="seconds to wait for the cluster to offer the workers' CPUs/GPUs before stopping "
                        "(exit 2); 0 = wait forever (autoscaling clusters)")
    g = p.add_argument_group("gradient synchronisation")
    g.add_argument("--accumulate-steps", type=int, default=d["accumulate_steps"].default,
                   help="micro-batches per all-reduce: each worker computes its share of the global batch "
                        "in K pieces and synchronises once")
    g.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=d["compute_dtype"].default,
                   help="the dtype layers compute in (auto: bfloat16 where the CPU computes it natively)")
    g.add_argument("--grad-dtype", choices=GRAD_DTYPES, default=d["grad_dtype"].default,
                   help="dtype of gradients on the wire (float16/bfloat16 halve the all-reduce's bytes)")
    g.add_argument("--bytes-per-pack", type=int, default=d["bytes_per_pack"].default,
                   help="all-reduce message size (0 = all gradients in one message)")
    g.add_argument("--steps-per-execution", type=int, default=d["steps_per_execution"].default,
                   help="training steps per tf.function call")
    g.add_argument("--step-metrics", action="store_true",
                   help="read metric results every step as Keras does (a cross-worker all-reduce each); "
                        "default: once per epoch, same numbers")
    g.add_argument("--profile-steps", type=int, default=d["profile_steps"].default,
                   help="after training, time N steps of compute, all-reduce and input on every worker; "
                        "the breakdown goes into metrics.json (0 = off)")
    g = p.add_argument_group("Ray run")
    g.add_argument("--name", default=None,
                   help="Ray Train run name (default: <model>-<time>); the same name and storage path resume a run")
    g.add_argument("--storage-path", default=None,
                   help="where Ray Train keeps runs and checkpoints: a folder every node sees, or s3://bucket/prefix "
                        "(default: Ray's, ~/ray_results, which is local to each node)")
    g.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL for s3:// locations (default: $AWS_ENDPOINT_URL_S3, "
                        "$AWS_ENDPOINT_URL, else AWS); credentials from the standard AWS_* variables")
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"].default)
    g.add_argument("--max-failures", type=int, default=d["max_failures"].default,
                   help="worker-group restarts from the latest checkpoint before giving up")
    g = p.add_argument_group("outputs")
    g.add_argument("--output", default=d["output"].default,
                   help="folder (or s3://bucket/prefix) for the model, metrics and plots")
    g.add_argument("--export", action=argparse.BooleanOptionalAction, default=d["export"].default,
                   help="run the edge export (TFLite/ONNX variants, drift report) after training")
    g.add_argument("--max-drop", type=float, default=d["max_drop"].default,
                   help="export gate: largest allowed accuracy drop of any edge variant, in points")
    g.add_argument("--qat-epochs", type=int, default=d["qat_epochs"].default,
                   help="export: quantisation-aware fine-tuning epochs")
    g.add_argument("--export-variants", type=variant_list, default=None, metavar="LIST",
                   help="export: only these variants, comma-separated (default: all, as python -m export)")
    g.add_argument("--limit", type=int, default=None, help="use only a seeded random N of each split's images (smoke runs, tries)")
    g.add_argument("--smoke-test", action="store_true",
                   help=f"a fast run through every stage: defaults become {SMOKE_TEST}")
    return p


def variant_list(text: str) -> str:
    """--export-variants: known variant names, checked before any training."""
    from export.variants import variants_problem

    names = [v.strip() for v in text.split(",") if v.strip()]
    problem = variants_problem(names)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return ",".join(names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --recipe's choices, then --smoke-test's SMOKE_TEST, replace the defaults, so
    options given explicitly (say --epochs 3) still win."""
    from toolkit.train.recipes import recipe_defaults

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe or args.smoke_test:
        parser.set_defaults(**{**(recipe_defaults(args.recipe) if args.recipe else {}),
                               **(SMOKE_TEST if args.smoke_test else {})})
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k != "smoke_test"})


def check_options(cfg: TrainConfig) -> str | None:
    """One line on the first place the run could not write (outputs, checkpoints), or the first layer module that
    cannot be imported (--custom-objects: the outputs and the export load the model with it), or None: checked
    before any data is read or worker started, so a bad option never costs a training run."""
    from toolkit.custom import import_custom_objects, parse_modules
    from toolkit.storage import check_writable

    for flag, location in (("--output", cfg.output), ("--storage-path", cfg.storage_path)):
        if location:
            problem = check_writable(location, cfg.s3_endpoint)
            if problem:
                return f"{flag} {location}: {problem}"
    if parse_modules(cfg.custom_objects):
        try:
            import_custom_objects(cfg.custom_objects)
        except ValueError as e:
            return f"--custom-objects {cfg.custom_objects}: {str(e).removeprefix('custom_objects: ')}"
    return None


class Refused(Exception):
    """Bad input or a run that cannot go on: the message is the one line to print, ``status`` the exit code."""

    def __init__(self, message: str, status: int = 2, prefix: str = "error") -> None:
        super().__init__(message)
        self.status, self.prefix = status, prefix


def open_checked(cfg: TrainConfig):
    """The run's data (toolkit.data: decoded or streamed), described in two lines, and checked to fit the
    model before any worker starts."""
    from toolkit.data import DataError, open_data
    from toolkit.models import ModelError, build_model, tfmot_note

    t0 = time.perf_counter()
    try:
        ds = open_data(cfg)
    except DataError as e:
        raise Refused(str(e)) from None
    counts = ds.class_counts()
    h, w, c = ds.image_shape
    n = {split: sum(v.values()) for split, v in counts.items()}
    val = f"{n['val']:,} val (val/), " if "val" in n else ""
    print(f"data: {ds.source}: {n['train']:,} train, {val}{n['test']:,} test images of {h}x{w}x{c}, "
          f"{ds.num_classes} classes ({time.perf_counter() - t0:.1f}s)", flush=True)
    print("classes (train): " + ", ".join(f"{k} {v:,}" for k, v in list(counts["train"].items())[:12])
          + (f", ... ({len(counts['train'])} classes)" if len(counts["train"]) > 12 else ""), flush=True)
    print(f"outputs: {cfg.output if '://' in cfg.output else os.path.abspath(cfg.output)}", flush=True)
    try:  # the model must fit the data before any worker starts
        build_model(cfg.model, ds.image_shape, ds.num_classes, custom_objects=cfg.custom_objects, seed=cfg.seed)
    except ModelError as e:
        raise Refused(str(e)) from None
    note = tfmot_note(cfg.model)
    if note:
        print(note, flush=True)
    return ds


def train(cfg: TrainConfig, ds, work: str):
    """Ray Train's outcome, or Refused for a layout the cluster cannot give, a diverged run or a Ctrl-C."""
    from toolkit.cluster import LayoutError
    from toolkit.train import TrainingDiverged, TrainingInterrupted, fit_distributed

    try:
        return fit_distributed(cfg, ds, work)
    except LayoutError as e:  # resolved before any worker starts
        raise Refused(str(e)) from None
    except TrainingDiverged as e:
        raise Refused(str(e), status=1) from None
    except TrainingInterrupted as e:
        raise Refused(str(e), status=130, prefix="stopped") from None  # 128 + SIGINT, as a shell reports a Ctrl-C


def export(cfg: TrainConfig, ds, local_out: str) -> int:
    """The edge export of the trained model, gated on --max-drop: 0 passed, 1 not (each failure named)."""
    from export.config import ExportConfig
    from export.run.pipeline import run_export
    from export.report import print_gate

    export_ds = ds.decoded(EXPORT_SAMPLE, seed=cfg.seed)  # the export works on arrays
    if export_ds is not ds:
        print(f"export: on a sample of {len(export_ds.x_train):,} train and {len(export_ds.x_test):,} "
              "test images of the streamed data", flush=True)
    report = run_export(
        ExportConfig(model=os.path.join(local_out, "model.keras"), data=cfg.data, out=os.path.join(local_out, "export"),
                     max_drop=cfg.max_drop, qat_epochs=cfg.qat_epochs, cache_dir=cfg.cache_dir, seed=cfg.seed,
                     variants=tuple(cfg.export_variants.split(",")) if cfg.export_variants else None,
                     image_size=cfg.image_size, resize=cfg.resize, channels=cfg.channels,
                     custom_objects=cfg.custom_objects),
        log=lambda line: print(line, flush=True), dataset=export_ds)
    return print_gate(report)


def run(cfg: TrainConfig) -> int:
    from toolkit.errors import one_line
    from toolkit.train.outputs import write_training_outputs
    from toolkit.storage import is_uri, upload_folder

    problem = check_options(cfg)
    if problem:
        raise Refused(problem)
    ds = open_checked(cfg)
    with tempfile.TemporaryDirectory() as work:
        outcome = train(cfg, ds, work)
        # An object-store output is written here first and uploaded once complete.
        local_out = os.path.join(work, "output") if is_uri(cfg.output) else cfg.output
        metrics = write_training_outputs(ds, outcome, local_out)
        where = cfg.output if is_uri(cfg.output) else os.path.abspath(cfg.output)
        print(f"test accuracy {metrics['test_accuracy']:.4f}  precision {metrics['test_precision']:.4f}  "
              f"recall {metrics['test_recall']:.4f}  ({metrics['epochs']} epochs, {metrics['wall_time_s']:.0f}s, "
              f"{metrics['train_images_per_s']:,.0f} img/s) -> {where}", flush=True)
        status = export(cfg, ds, local_out) if cfg.export else 0
        if is_uri(cfg.output):
            try:
                keys = upload_folder(local_out, cfg.output, cfg.s3_endpoint, last=("metrics.json",))
            except Exception as e:  # the bucket went away during the run: say so, keep the exit code meaningful
                raise Refused(f"--output {cfg.output}: upload failed: {one_line(e, typed=False)}", status=1) from None
            print(f"uploaded {len(keys)} files to {cfg.output}", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:  # a bad option value, from TrainConfig
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    except Refused as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
