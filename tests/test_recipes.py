"""Training recipes (issue 21): --recipe presets that explicit options override, schedules that do what they say
and survive a checkpoint, and a short real run with each recipe that learns."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT, require_shared_cifar
from toolkit.config import TrainConfig
from toolkit.train.recipes import RECIPES, learning_rate_schedule, make_optimizer

sys.path.insert(0, str(ROOT / "jobs"))
import train as train_job  # noqa: E402


def test_explicit_options_override_a_recipe():
    cfg = train_job.config_from_args(train_job.parse_args(["--recipe", "fast", "--epochs", "3", "--learning-rate", "0.1"]))
    assert (cfg.recipe, cfg.optimizer, cfg.schedule, cfg.epochs, cfg.learning_rate) == ("fast", "sgd", "cosine", 3, 0.1)
    assert cfg.label_smoothing == RECIPES["fast"]["label_smoothing"] and cfg.weight_decay == RECIPES["fast"]["weight_decay"]
    tiny = train_job.config_from_args(train_job.parse_args(["--recipe", "mlperf_tiny", "--smoke-test"]))
    assert (tiny.model, tiny.schedule, tiny.epochs) == ("resnet8", "exponential", 2)  # the smoke test's size
    # The defaults are the fast recipe (the measured best, toolkit/config.py); "adam" keeps the previous ones.
    plain = train_job.config_from_args(train_job.parse_args([]))
    fast = train_job.config_from_args(train_job.parse_args(["--recipe", "fast"]))
    assert plain.recipe is None and fast.to_dict() == {**plain.to_dict(), "recipe": "fast"}
    adam = train_job.config_from_args(train_job.parse_args(["--recipe", "adam"]))
    assert (adam.optimizer, adam.learning_rate, adam.schedule, adam.batch_size) == ("adam", 2e-3, "constant", 256)
    with pytest.raises(SystemExit):
        train_job.parse_args(["--recipe", "turbo"])
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine, exponential"):
        TrainConfig(schedule="linear")


def test_schedules_do_what_they_say():
    steps = 10
    cos = learning_rate_schedule(TrainConfig(optimizer="sgd", learning_rate=0.2, schedule="cosine", warmup_epochs=2,
                                             epochs=6), steps)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(0.1) and float(cos(20)) == pytest.approx(0.2)
    assert float(cos(40)) == pytest.approx(0.1, rel=1e-3) and float(cos(60)) == pytest.approx(0.0, abs=1e-6)
    # A short run keeps a third of itself for the warm-up: 2 warm-up epochs of a 2-epoch run would never decay.
    short = learning_rate_schedule(TrainConfig(optimizer="sgd", learning_rate=0.2, schedule="cosine", warmup_epochs=2,
                                               epochs=3), steps)
    assert float(short(10)) == pytest.approx(0.2) and float(short(30)) == pytest.approx(0.0, abs=1e-6)
    exp = learning_rate_schedule(TrainConfig(learning_rate=1e-3, schedule="exponential", decay_per_epoch=0.99), steps)
    assert float(exp(9)) == pytest.approx(1e-3) and float(exp(10)) == pytest.approx(0.99e-3)
    assert float(exp(500 * steps)) == pytest.approx(1e-3 * 0.99 ** 500, rel=1e-4)


def test_a_schedule_survives_the_checkpoint(tmp_path):
    """A resumed run continues its schedule: the optimizer (schedule and step count) is saved with the model."""
    from toolkit.models import compile_model, make_model
    from toolkit.tf import import_keras

    keras = import_keras()
    m = make_model("seed_cnn")
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.1, schedule="cosine", warmup_epochs=1, epochs=3,
                      weight_decay=5e-4, label_smoothing=0.1)
    compile_model(m, make_optimizer(cfg, 4), label_smoothing=cfg.label_smoothing)
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(np.arange(64) % 10, 10)
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    m.save(tmp_path / "m.keras")
    back = keras.models.load_model(tmp_path / "m.keras")
    assert int(back.optimizer.iterations) == 4
    schedule = back.optimizer.get_config()["learning_rate"]
    assert schedule == m.optimizer.get_config()["learning_rate"] and schedule["class_name"] == "CosineDecay"
    assert schedule["config"]["warmup_target"] == pytest.approx(0.1) and schedule["config"]["warmup_steps"] == 4
    assert back.optimizer.get_config()["weight_decay"] == pytest.approx(5e-4)
    assert back.loss.get_config()["label_smoothing"] == pytest.approx(0.1)


# What each recipe sets, written out by hand from its comment in toolkit/train/recipes.py: (optimizer, its options),
# batch, epochs, augmentation, weight decay, label smoothing, model, and its learning rate at chosen steps of a run
# with 10 steps per epoch.
RECIPE_VALUES = {
    "tutorial": (("Adam", {}), 32, 30, False, None, 0.0, "seed_cnn", {0: 1e-3, 150: 1e-3, 299: 1e-3}),
    "adam": (("Adam", {}), 256, 30, True, None, 0.0, "seed_cnn", {0: 2e-3, 150: 2e-3, 299: 2e-3}),
    # cosine after a linear warm-up of 2 epochs (20 steps): half the step halfway through the warm-up, the peak
    # at its end, half again halfway through the 280 decaying steps, zero at the end
    "fast": (("SGD", {"momentum": 0.9, "nesterov": True}), 256, 30, True, 5e-4, 0.1, "seed_cnn",
             {0: 0.0, 10: 0.025, 20: 0.05, 160: 0.025, 300: 0.0}),
    "mlperf_tiny_fast": (("SGD", {"momentum": 0.9, "nesterov": True}), 128, 105, True, 5e-4, 0.1, "resnet8",
                         {0: 0.0, 10: 0.05, 20: 0.1, 535: 0.05, 1050: 0.0}),
    # 0.99 per epoch, stepwise: the same through an epoch, 0.99^k after k epochs
    "mlperf_tiny": (("Adam", {}), 32, 500, True, None, 0.0, "resnet8",
                    {0: 1e-3, 9: 1e-3, 10: 0.99e-3, 1000: 1e-3 * 0.99 ** 100}),
}


def test_the_expected_values_name_every_recipe():
    assert set(RECIPE_VALUES) == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_sets_what_it_says(recipe):
    """Each recipe's optimizer, schedule (its step at chosen steps), weight decay, label smoothing, batch, epochs,
    augmentation and model, exactly: a miswired schedule or a dropped option fails here, where a short learning
    run might still clear its bar."""
    from toolkit.models import compile_model, make_model

    (optimizer, options), batch, epochs, augment, decay, smoothing, model_name, steps = RECIPE_VALUES[recipe]
    cfg = TrainConfig(**RECIPES[recipe])
    assert (cfg.batch_size, cfg.epochs, cfg.augment, cfg.model) == (batch, epochs, augment, model_name)
    opt = make_optimizer(cfg, 10)
    config = opt.get_config()
    assert type(opt).__name__ == optimizer and config["weight_decay"] == decay, config
    for key, value in options.items():
        assert config[key] == pytest.approx(value), (key, config)
    lr = config["learning_rate"]  # the schedule the optimizer steps by (saved with the model)
    if isinstance(lr, dict):
        from toolkit.tf import import_keras

        lr = import_keras().optimizers.schedules.deserialize(lr)
    for step, expected in steps.items():
        got = float(lr(step)) if callable(lr) else float(lr)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9), (recipe, step, got, expected)
    model = make_model("seed_cnn")
    compile_model(model, opt, 1, cfg.label_smoothing)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(smoothing)


@pytest.fixture(scope="module")
def cifar_sample(cache_dir):
    from toolkit.data import load_dataset

    ds = load_dataset(str(require_shared_cifar()), cache_dir)
    rng = np.random.default_rng(0)
    tr, te = rng.permutation(len(ds.x_train))[:4000], rng.permutation(len(ds.x_test))[:1000]
    return ds.x_train[tr], ds.y_train[tr], ds.x_test[te], ds.y_test[te]


# The default recipe after 3 epochs on 4,000 images, measured over eight seeds (0-7) on the development machine
# (AMD EPYC, 2026-12-07): 36.1-42.1% on the 1,000 test images, mean 40.1%, standard deviation 2.0 points. 30% is five
# standard deviations under the mean and twenty over chance (a schedule whose step never leaves zero stays there).
LEARN_FLOOR = 0.30


def test_the_default_recipe_learns(cifar_sample):
    """The default recipe (fast) end to end on 4,000 real CIFAR-10 images for 3 epochs at batch 64: over LEARN_FLOOR
    on 1,000 test images. What each recipe sets is test_each_recipe_sets_what_it_says's."""
    from toolkit.data.pipeline import make_eval_dataset, make_train_dataset
    from toolkit.models import compile_model, make_model
    from toolkit.tf import import_keras

    import_keras().utils.set_random_seed(0)
    x, y, xt, yt = cifar_sample
    cfg = TrainConfig(**{**RECIPES["fast"], "epochs": 3, "batch_size": 64})
    steps = len(x) // cfg.batch_size
    model = make_model(cfg.model)
    compile_model(model, make_optimizer(cfg, steps), 4, cfg.label_smoothing)
    model.fit(make_train_dataset(x, y, cfg.batch_size, num_classes=10, augment=cfg.augment, seed=0),
              epochs=cfg.epochs, steps_per_epoch=steps, verbose=0)
    acc = model.evaluate(make_eval_dataset(xt, yt, 250, num_classes=10), verbose=0)[1]
    assert acc > LEARN_FLOOR, f"fast: test accuracy {acc:.3f} after 3 epochs"


# The first flags of /proc/cpuinfo on three CPUs: an Intel Xeon with AMX, an AMD EPYC (Zen 4) with avx512_bf16, and
# an AMD EPYC (Zen 2) without either.
CPUINFO = {
    "intel_amx": "processor\t: 0\nflags\t\t: fpu vme avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n",
    "epyc_zen4": "processor\t: 0\nflags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni\n",
    "epyc_zen2": "processor\t: 0\nflags\t\t: fpu vme avx2 fma sha_ni\nbugs\t\t: avx512_bf16_is_not_a_flag\n",
}


def test_the_compute_dtype_follows_the_cpu(monkeypatch):
    """auto: bfloat16 where the CPU computes it natively (about 1.9x faster steps here, benchmarks/step_speed.py).
    The decision for each kind of CPU, whichever CPU runs the test."""
    from toolkit import tf as toolkit_tf
    from toolkit.tf import bf16_in_cpuinfo, resolve_compute_dtype

    assert [bf16_in_cpuinfo(CPUINFO[k]) for k in ("intel_amx", "epyc_zen4", "epyc_zen2")] == [True, True, False]
    assert bf16_in_cpuinfo("") is False
    for native, policy in ((True, "mixed_bfloat16"), (False, "float32")):
        monkeypatch.setattr(toolkit_tf, "cpu_has_bf16", lambda: native)
        assert resolve_compute_dtype("auto", use_gpu=False)[0] == policy
        assert resolve_compute_dtype("float32", use_gpu=False) == ("float32", "asked")
        assert resolve_compute_dtype("bfloat16", use_gpu=True) == ("mixed_bfloat16", "asked")
        assert resolve_compute_dtype("auto", use_gpu=True)[0] == "float32"
    with pytest.raises(ValueError, match="compute_dtype must be one of auto, float32, bfloat16"):
        TrainConfig(compute_dtype="float8")


def test_auto_keeps_models_with_slow_bfloat16_layers_in_float32(tmp_path, monkeypatch):
    """Strided and 5x5 depthwise convolutions train 2-3.5x slower in bfloat16 (benchmarks/results/bf16_layers.md):
    under auto, MobileNetV3Small trains in float32, the 3x3-stride-1 nets in bfloat16 where the CPU has it (here: a
    CPU that has it, whichever runs the test)."""
    from types import SimpleNamespace

    from toolkit import tf as toolkit_tf
    from toolkit.models import make_model
    from toolkit.tf import import_keras, slow_in_bfloat16
    from toolkit.train.worker import build_in_compute_dtype

    monkeypatch.setattr(toolkit_tf, "cpu_has_bf16", lambda: True)

    keras = import_keras()

    def mobilenet():
        return keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=10)

    def seed_cnn():
        return make_model("seed_cnn", input_shape=(32, 32, 3), num_classes=10)

    slow = slow_in_bfloat16(mobilenet())
    assert slow and all("depthwise" in name for name in slow), slow
    assert slow_in_bfloat16(seed_cnn()) == [] and slow_in_bfloat16(make_model("resnet8", (32, 32, 3), 10)) == []
    run = SimpleNamespace(cfg=TrainConfig(compute_dtype="auto"), rank=1)
    try:
        assert build_in_compute_dtype(run, mobilenet).layers[-1].compute_dtype == "float32"
        assert build_in_compute_dtype(run, seed_cnn).layers[1].compute_dtype == "bfloat16"
        run.cfg = TrainConfig(compute_dtype="bfloat16")  # asked for: the user's choice stands
        assert build_in_compute_dtype(run, mobilenet).layers[-2].compute_dtype == "bfloat16"
        # A float32 model file keeps its own policy under auto, loaded once (no rebuild for layers it does not
        # compute in bfloat16).
        keras.mixed_precision.set_global_policy("float32")
        mobilenet().save(tmp_path / "m.keras", save_format="keras_v3")
        loads = []

        def model_file():
            loads.append(1)
            return keras.models.load_model(tmp_path / "m.keras")

        run.cfg = TrainConfig(compute_dtype="auto")
        assert build_in_compute_dtype(run, model_file).layers[-2].compute_dtype == "float32" and len(loads) == 1
    finally:
        keras.mixed_precision.set_global_policy("float32")



def test_batch_norm_statistics_are_recomputed_after_a_short_run():
    """toolkit.train.outputs: after 70 steps at momentum 0.99 about half of batch norm's initial statistics are
    left, and the recomputed ones are the mean over the images of what the layer sees (one batch's mean, then the
    running mean of the batches'); after a long run nothing is left and nothing is recomputed."""
    import numpy as np

    from toolkit.tf import import_keras
    from toolkit.train.outputs import RECALIBRATE_ABOVE, batch_norm_left, recalibrate_batch_norm

    keras = import_keras()
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.BatchNormalization()(conv(inp))))
    model = keras.Model(inp, out)
    images = np.random.default_rng(0).integers(0, 256, (500, 8, 8, 3)).astype(np.uint8)
    assert batch_norm_left(model, 70) == pytest.approx(0.99 ** 70) and batch_norm_left(model, 70) > RECALIBRATE_ABOVE
    assert batch_norm_left(model, 5280) < RECALIBRATE_ABOVE
    done = recalibrate_batch_norm(model, images, seed=0, batch=250)
    assert done == {"images": 500, "layers": 1}
    seen = conv(images.astype(np.float32)).numpy()
    norm = model.layers[2]
    assert np.allclose(norm.moving_mean.numpy(), seen.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
    assert norm.momentum == 0.99  # put back
