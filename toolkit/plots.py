"""PNG plots of a training run: curves, confusion matrix, sample images. Written atomically."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from toolkit.files import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_history(history: dict[str, list[float]], path: str | os.PathLike) -> None:
    """Training vs validation curves for accuracy, precision and loss."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("accuracy", "precision", "loss")):
        train = history.get(key, [])
        val = history.get(f"val_{key}", [])
        epochs = np.arange(1, len(train) + 1)
        ax.plot(epochs, train, marker="o", ms=3, label="training")
        ax.plot(epochs[: len(val)], val, marker="o", ms=3, label="validation")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                          title: str = "Confusion matrix (test split)") -> None:
    plt = pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > thresh else "black")
    save_figure(fig, path)


def plot_samples(x: np.ndarray, y: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                 n: int = 25) -> None:
    """A grid of ``n`` images (a seeded random pick: trees are stored class by class) with their labels;
    grayscale images in grey."""
    plt = pyplot()
    n = min(n, len(x))
    pick = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
    x, y = x[pick], y[pick]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8))
    for i, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if i < n:
            if x[i].shape[-1] == 1:
                ax.imshow(x[i][:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(x[i])
            ax.set_title(class_names[int(y[i])], fontsize=8)
    save_figure(fig, path)
