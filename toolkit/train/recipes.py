"""Training recipes: named sets of training choices (``jobs/train.py --recipe NAME``), each choice with why.

A recipe replaces the defaults, never an option given on the command line (``--recipe fast --epochs 20`` trains
20 epochs of the fast recipe). The learning rate is the step size for the *global* batch, whatever the worker
layout: the gradients of all workers' micro-batches are averaged into one step (MultiWorkerMirroredStrategy), so
the same global batch and learning rate take the same steps on one worker or eight; change the global batch and
the learning rate is yours to scale (linearly for SGD, as Goyal et al.; Adam's step is scale-free and wants less).
"""

from __future__ import annotations

# A warm-up takes at most this share of a run (one-cycle schedules ramp up over about 0.3 of theirs): the fast
# recipe's 2 warm-up epochs are a fifteenth of 30, but with --smoke-test's 2 epochs they were the whole run, and
# the step only ever ramped up (edge_resnet, 2 epochs: 10.45%, chance).
MAX_WARMUP_SHARE = 1 / 3

RECIPES: dict[str, dict] = {
    # The tutorial's own: Adam at Keras' default step, batch 32, 30 epochs, no augmentation
    # (67.09% test accuracy for seed_cnn in the tutorial).
    "tutorial": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 32, "epochs": 30, "augment": False,
                 "schedule": "constant", "warmup_epochs": 0.0, "weight_decay": 0.0, "label_smoothing": 0.0},
    # This toolkit's defaults until 2026-11-29: Adam at 2e-3 for batch 256 (about 6,500 images/s on two workers
    # against 1,200 at 32), constant step, crop-and-flip augmentation (seed_cnn, 30 epochs: 73.83%).
    "adam": {"optimizer": "adam", "learning_rate": 2e-3, "batch_size": 256, "epochs": 30, "augment": True,
             "schedule": "constant", "warmup_epochs": 0.0, "weight_decay": 0.0, "label_smoothing": 0.0},
    # Where the epochs go in fast CIFAR-10 training (Page's ResNet "bag of tricks", Jordan's airbench): SGD with
    # Nesterov momentum 0.9 after a short linear warm-up, cosine decay to zero, label smoothing 0.1, decoupled
    # weight decay 5e-4, crop-and-flip augmentation, batch 256. The step: 0.05 (seed_cnn, 10,000 images, 6 epochs,
    # one process: 47.5% test accuracy at 0.05, 38.6% at 0.02, 29.2% at 0.2, which those papers use with batch
    # norm; seed_cnn has none). The defaults (toolkit/config.py) since it beat "adam" side by side at 30 epochs
    # (76.15% against 73.83%, benchmarks/results/recipes_30.md).
    "fast": {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9, "batch_size": 256, "epochs": 30,
             "augment": True, "schedule": "cosine", "warmup_epochs": 2.0, "weight_decay": 5e-4,
             "label_smoothing": 0.1},
    # MLPerf Tiny's resnet8 in the fast recipe, in CI's 45 minutes on 2 cores: its step 0.1 (this batch-normalised
    # net, 12 epochs: 74.45% test at 0.1, 71.12% at 0.05, benchmarks/results/resnet8_probe.md; weight decay 1e-4
    # instead of 5e-4 changed nothing, 74.34%), at batch 128 for 105 epochs: 85.14% test, int8 85.11%, jobs/train.py
    # 40.2 min (benchmarks/results/resnet8_b128.md; seed 1: 85.14% / 85.09%, resnet8_b128_seed1.md). Batch 256 for
    # 120 epochs gave 84.58% / int8 84.60% in 41.1 min (resnet8_120.md): batch 128 gives this 78k-parameter net twice
    # the steps for an epoch only a little slower (22.5 s against 20.1 under jobs/train.py, from those files); the
    # step kept at 0.1, not halved, as the probe favoured the larger step.
    "mlperf_tiny_fast": {"model": "resnet8", "optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                         "batch_size": 128, "epochs": 105, "augment": True, "schedule": "cosine",
                         "warmup_epochs": 2.0, "weight_decay": 5e-4, "label_smoothing": 0.1},
    # MLPerf Tiny's image-classification reference recipe for resnet8: Adam 1e-3 decayed 0.99 per epoch,
    # batch 32, 500 epochs (its L2 1e-4 is in the model, toolkit.models.resnet8).
    "mlperf_tiny": {"model": "resnet8", "optimizer": "adam", "learning_rate": 1e-3, "batch_size": 32, "epochs": 500,
                    "augment": True, "schedule": "exponential", "decay_per_epoch": 0.99, "warmup_epochs": 0.0,
                    "weight_decay": 0.0, "label_smoothing": 0.0},
}


def recipe_defaults(name: str) -> dict:
    """The TrainConfig fields recipe ``name`` sets; ValueError naming the argument for an unknown one."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def learning_rate_schedule(cfg, steps_per_epoch: int):
    """``cfg.learning_rate`` as a Keras schedule over ``cfg.epochs`` epochs of ``steps_per_epoch`` steps (or the
    constant). Built-in schedules: they are saved with the model, so a resumed run continues its schedule from the
    optimizer's step count."""
    from toolkit.tf import import_keras

    schedules = import_keras().optimizers.schedules
    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        warmup = int(round(min(cfg.warmup_epochs, cfg.epochs * MAX_WARMUP_SHARE) * steps_per_epoch))
        total = max(cfg.epochs * steps_per_epoch - warmup, 1)
        return schedules.CosineDecay(0.0 if warmup else lr, total, alpha=0.0, warmup_target=lr if warmup else None,
                                     warmup_steps=warmup)
    if cfg.schedule == "exponential":
        return schedules.ExponentialDecay(lr, steps_per_epoch, cfg.decay_per_epoch, staircase=True)
    return lr


def make_optimizer(cfg, steps_per_epoch: int):
    """The optimizer ``cfg`` (a toolkit.config.TrainConfig) asks for, on its learning_rate_schedule."""
    from toolkit.tf import import_keras

    keras = import_keras()
    lr, decay = learning_rate_schedule(cfg, steps_per_epoch), cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum, nesterov=True, weight_decay=decay)
    return keras.optimizers.Adam(learning_rate=lr, weight_decay=decay)
