"""Where a training step's time goes, measured on each worker after training (``profile_steps``).

Three timers, each part run alone on the worker's own threads, so the parts can be compared with
the measured step time:
  compute      forward, backward and optimizer update of one per-worker batch, no communication;
  all_reduce   one all-reduce of the model's gradients (as sent: dtype, packing), all workers at once;
  input        producing one per-worker batch from the tf.data pipeline (decode-free: arrays in memory).
``step`` (the measured training step) minus compute and all-reduce is what neither explains:
scheduling, waiting for the slowest worker, threads fighting over cores.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from toolkit.tf import import_keras, import_tf
from toolkit.timing import time_calls


def mean_ms(fn: Callable[[], Any], steps: int, warmup: int = 2) -> float:
    return float(np.mean(time_calls(fn, steps, warmup)))


def step_breakdown(model, strategy, dataset_fn: Callable[[], Any], *, steps: int, accumulate_steps: int = 1,
                   grad_dtype: str = "float32", options: Any = None) -> dict[str, float]:
    """Milliseconds per step for compute, all-reduce and input on this worker. Every worker must call
    it at the same point (the all-reduce timer is a collective)."""
    tf = import_tf()
    keras = import_keras()
    from toolkit.train.step import all_reduce_gradients

    # input: the worker's own pipeline, pulled as fast as it goes
    it = iter(dataset_fn())
    input_ms = mean_ms(lambda: next(it), steps)
    x, y = next(it)

    # compute: a local copy of the model (built outside any strategy scope), the same batch, the
    # model's own compiled loss and optimizer class, no communication
    local = keras.models.clone_model(model)
    local.set_weights(model.get_weights())
    optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
    loss_fn = keras.losses.get(model.loss)
    micro = tf.split(x, accumulate_steps), tf.split(y, accumulate_steps)

    @tf.function
    def compute():
        grads, loss = None, None
        for xs, ys in zip(*micro):
            with tf.GradientTape() as tape:
                loss = loss_fn(ys, local(xs, training=True))
            g = tape.gradient(loss, local.trainable_variables)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        optimizer.apply_gradients(zip(grads, local.trainable_variables))
        return loss

    compute_ms = mean_ms(lambda: compute().numpy(), steps)

    # all-reduce: the gradients' shapes, sent the way training sends them
    with strategy.scope():
        shapes = [v.shape for v in model.trainable_variables]
        variables = model.trainable_variables

        @tf.function
        def reduce():
            def replica_fn():
                grads = [tf.ones(s, tf.float32) for s in shapes]
                out = all_reduce_gradients(grads, variables, grad_dtype, options)
                return tf.add_n([tf.reduce_sum(o) for o in out])
            return strategy.run(replica_fn)

        reduce_ms = mean_ms(lambda: strategy.experimental_local_results(reduce())[0].numpy(), steps)
    grad_bytes = int(sum(np.prod(s) for s in shapes)) * tf.as_dtype(grad_dtype).size
    return {"compute_ms": compute_ms, "all_reduce_ms": reduce_ms, "input_ms": input_ms,
            "gradient_bytes": grad_bytes, "profile_steps": steps}

