"""Everything a training run leaves in its output folder: model, metrics, history, plots."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import numpy as np

from toolkit.custom import custom_scope
from toolkit.evaluate import classification_metrics
from toolkit.models import keras3_source
from toolkit.files import atomic_path, copy_file, git_revision, write_json, write_text
from toolkit.plots import plot_confusion_matrix, plot_history, plot_samples
from toolkit.tf import import_keras
from toolkit.train import MODEL_FILE, TrainOutcome


def predict_probs(model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities for uint8 images (the model scales pixels itself)."""
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def time_to_accuracy(history: dict[str, list[float]], target: float, key: str = "val_accuracy") -> dict | None:
    """The first epoch whose ``key`` reaches ``target``, with the epoch and training-step seconds spent
    up to and including it (None if never reached)."""
    for i, value in enumerate(history.get(key, [])):
        if value >= target:
            return {"target": target, "epoch": i + 1,
                    "epoch_time_s": float(sum(history.get("epoch_time_s", [])[: i + 1])),
                    "train_time_s": float(sum(history.get("train_time_s", [])[: i + 1]))}
    return None


def slowest_step_breakdown(workers: list[dict]) -> dict | None:
    """The profile of the worker with the slowest compute (it sets the pace of every synchronous step)."""
    profiles = [w["step_breakdown"] for w in workers if w.get("step_breakdown")]
    return max(profiles, key=lambda p: p["compute_ms"]) if profiles else None


def evaluate_test_split(model, ds) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) of the whole test split, batch by batch (a streamed split is read
    and decoded by Ray Data as it goes)."""
    ys, probs = [], []
    for x, y in ds.iter_test():
        ys.append(y)
        probs.append(predict_probs(model, x))
    return np.concatenate(ys), np.concatenate(probs)


def training_metrics(ds, outcome: TrainOutcome, test: dict) -> dict:
    """metrics.json: the test split's metrics, the run's figures, and where they came from."""
    counts = ds.class_counts()
    return {
        "test_accuracy": test["accuracy"],
        "test_precision": test["precision"],
        "test_recall": test["recall"],
        "test_macro_precision": test["macro_precision"],
        "test_macro_recall": test["macro_recall"],
        "val_accuracy": max(outcome.history.get("val_accuracy", [float("nan")])),
        "per_class_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "class_names": list(ds.class_names),
        "class_counts": counts,
        "image_shape": list(ds.image_shape),
        "validation": "val/ split of the data" if "val" in counts else
                      f"{outcome.config.val_fraction:g} of the training split (seeded)",
        "ingest": ds.ingest,
        "epochs": outcome.epochs_run,
        "best_epoch": outcome.best_epoch,
        "wall_time_s": outcome.wall_time_s,
        "train_images_per_s": outcome.train_images_per_s,
        "num_workers": outcome.config.num_workers,
        "cpus_per_worker": outcome.config.cpus_per_worker,
        "workers": outcome.workers,
        # Failures survived: worker-group restarts in this run (each from the latest checkpoint), the
        # epochs each start began from, and the epoch a rerun of the command resumed from.
        "restarts": outcome.restarts,
        "starts": outcome.starts,
        "resumed_from_epoch": outcome.resumed_from_epoch,
        "step_breakdown_ms": slowest_step_breakdown(outcome.workers),
        "time_to_70pct_val_accuracy": time_to_accuracy(outcome.history, 0.70),
        "num_train_images": sum(counts["train"].values()),
        "num_test_images": sum(counts["test"].values()),
        "data_source": ds.source,
        "ray_run_path": outcome.run_path,
        # This process's peak resident memory (Linux ru_maxrss, KiB): the driver's share of the data.
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "git_revision": git_revision(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": outcome.config.to_dict(),
    }


TF_KERAS_MODEL_FILE = "model_tf_keras.keras"  # beside a Keras 3 model.keras: the rebuild that trained


def save_as_keras3(trained, original, path: Path, images: np.ndarray) -> dict:
    """The trained weights of a Keras 3 model's tf_keras rebuild (toolkit.keras3) copied back into the user's Keras 3
    model and saved at ``path`` by Keras 3; returns how many layers took weights and how closely the two agree on
    ``images`` (the rebuild may have computed in bfloat16, the Keras 3 model computes in float32)."""
    from toolkit.files import atomic_path
    from toolkit.keras3 import copy_weights_back

    layers = copy_weights_back(trained, original)
    a, b = predict_probs(trained, images), predict_probs(original, images)
    with atomic_path(path, suffix=".keras") as tmp:
        original.save(tmp)
    return {"saved_by": "keras 3", "layers_copied": layers, "tf_keras_model": TF_KERAS_MODEL_FILE,
            "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "max_probability_difference": float(np.max(np.abs(a - b))), "images": int(len(images))}


# A short run leaves batch norm's moving statistics mostly at their initial values: with Keras' momentum of 0.99,
# resnet8's 70 steps (2 epochs of 9,000 images at 256) keep 0.99^70 = 49% of them, and the model evaluates far below
# what it learned (26.95% test accuracy where recomputing the statistics on 2,000 training images gave 40.04%,
# 2026-12-07). Recalibrated when more than this share of the initial values is left; a 30-epoch default run
# (5,280 steps) keeps none, and is not touched.
RECALIBRATE_ABOVE = 0.01


def batch_norm_left(model, steps: int) -> float:
    """The share of batch norm's initial moving statistics ``steps`` of training left in ``model`` (0 without batch
    norm)."""
    keras = import_keras()
    momenta = [m.momentum for m in model.submodules if isinstance(m, keras.layers.BatchNormalization)]
    return max(momenta) ** steps if momenta else 0.0


def recalibrate_batch_norm(model, images: np.ndarray, seed: int, limit: int = 2000, batch: int = 250) -> dict:
    """Batch norm's moving statistics recomputed on up to ``limit`` seeded training images: the mean of the batches'
    statistics, which inference then uses as training did."""
    keras = import_keras()
    norms = [m for m in model.submodules if isinstance(m, keras.layers.BatchNormalization)]
    x = images[np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])]
    momenta = [n.momentum for n in norms]
    try:
        for i, start in enumerate(range(0, len(x), batch)):
            for n in norms:
                n.momentum = i / (i + 1)  # the running mean of the batches' statistics
            model(np.asarray(x[start:start + batch], np.float32), training=True)
    finally:
        for n, m in zip(norms, momenta):
            n.momentum = m
    return {"images": int(len(x)), "layers": len(norms)}


def write_training_outputs(ds, outcome: TrainOutcome, output: str) -> dict:
    """Evaluate the trained model on the test split of ``ds`` (a toolkit.data Dataset or Stream) and write
    every artifact into ``output``; metrics.json last, so its presence means the folder is complete."""
    keras = import_keras()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = outcome.config
    with custom_scope(cfg.custom_objects, keras):  # the model's own layers (--custom-objects)
        model = keras.models.load_model(outcome.model_path)
    steps = outcome.epochs_run * math.ceil(sum(ds.class_counts()["train"].values()) * (1 - cfg.val_fraction)
                                           / cfg.batch_size)
    recalibrated = None
    if batch_norm_left(model, steps) > RECALIBRATE_ABOVE:  # the saved model is the recalibrated one
        y_before, p_before = evaluate_test_split(model, ds)
        recalibrated = {**recalibrate_batch_norm(model, ds.plot_sample(cfg.seed)[0], cfg.seed),
                        "steps_trained": int(steps), "initial_share_left": batch_norm_left(model, steps),
                        "test_accuracy_before": float(np.mean(p_before.argmax(1) == y_before))}
    y_test, p_test = evaluate_test_split(model, ds)
    test = classification_metrics(y_test, p_test, ds.class_names)
    metrics = training_metrics(ds, outcome, test)
    if recalibrated:
        metrics["batch_norm_recalibrated"] = recalibrated
    with custom_scope(cfg.custom_objects, keras):
        original = keras3_source(cfg.model, ds.image_shape, ds.num_classes, cfg.custom_objects, cfg.seed)
    trained_file = out / (MODEL_FILE if original is None else TF_KERAS_MODEL_FILE)
    if recalibrated:
        with atomic_path(trained_file, suffix=".keras") as tmp:
            model.save(tmp)
    else:
        copy_file(outcome.model_path, trained_file)
    if original is not None:  # a Keras 3 model comes back in Keras 3; the tf_keras rebuild that trained beside it
        metrics["keras3"] = save_as_keras3(model, original, out / MODEL_FILE, ds.plot_sample(cfg.seed)[0][:256])
    write_json(out / "history.json", outcome.history)
    write_text(out / "labels.txt", "".join(f"{c}\n" for c in ds.class_names))
    plot_history(outcome.history, out / "curves.png")
    plot_confusion_matrix(np.asarray(test["confusion_matrix"]), ds.class_names, out / "confusion_matrix.png")
    plot_samples(*ds.plot_sample(outcome.config.seed), ds.class_names, out / "samples.png")
    write_json(out / "metrics.json", metrics)
    return metrics
