"""The training step a worker runs: gradient accumulation and the gradient all-reduce.

Keras's own ``train_step`` all-reduces float32 gradients once per batch inside the optimizer.
``install_train_step`` replaces it, on the model instance only (nothing is saved with the model),
when a run asks for more: K micro-batches per all-reduce (``accumulate_steps``), or gradients sent
as float16/bfloat16 (``grad_dtype``). The maths is the same as Keras's step: each replica's loss is
already scaled by 1 / replicas, so the summed gradients are the global batch's mean gradient.
"""

from __future__ import annotations

from typing import Any, Optional

from toolkit.tf import import_keras, import_tf


def communication_options(bytes_per_pack: int = 0, timeout_s: Optional[float] = None):
    """``tf.distribute.experimental.CommunicationOptions`` for the strategy's collectives."""
    tf = import_tf()
    return tf.distribute.experimental.CommunicationOptions(bytes_per_pack=bytes_per_pack, timeout_seconds=timeout_s)


def all_reduce_gradients(grads: list, variables: list, grad_dtype: str = "float32", options: Any = None) -> list:
    """Sum ``grads`` over all replicas (one batched collective), sent as ``grad_dtype``, returned in the
    variables' dtypes. A no-op with one replica: nothing to exchange."""
    tf = import_tf()
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    wire = tf.as_dtype(grad_dtype)
    sent = [tf.cast(g, wire) if g.dtype != wire else g for g in grads]
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, sent, options=options)
    return [tf.cast(g, v.dtype) for g, v in zip(summed, variables)]


def install_train_step(model, *, accumulate_steps: int = 1, grad_dtype: str = "float32", options: Any = None,
                       deferred_metrics: Optional[bool] = None) -> bool:
    """Give ``model`` (compiled, inside its strategy's scope) a train step that computes each batch
    as ``accumulate_steps`` micro-batches and all-reduces their summed gradients once, as ``grad_dtype``.

    ``deferred_metrics`` (default: on when there is more than one replica): steps only accumulate the
    metrics' states, and ``metric_results`` reads them once per epoch. Keras's own step reads every
    metric's result every step, and under MultiWorkerMirroredStrategy each read is a cross-worker
    all-reduce: several latency-bound collectives per step besides the gradients' one.
    Returns False (Keras's steps kept) when nothing is asked for."""
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    deferred = model.distribute_strategy.num_replicas_in_sync > 1 if deferred_metrics is None else deferred_metrics
    if accumulate_steps == 1 and grad_dtype == "float32" and not deferred:
        return False
    model.train_step = make_train_step(model, accumulate_steps, grad_dtype, options, deferred)
    model.train_function = None  # rebuilt around the new step on the next fit
    if deferred:
        model.test_step = make_test_step(model)
        model.test_function = None
        # Keras's "auto" sums every step output across workers (a collective per value per step).
        model.distribute_reduction_method = "first"
    model._toolkit_deferred_metrics = deferred
    return True


DEFERRED_KEY = "_metrics_deferred"


def _gradients(model, x, y, sw, scale):
    """One (micro-)batch's gradients (zeros for variables the loss does not reach) and predictions."""
    tf = import_tf()
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred, sw)
        loss = loss * scale if scale != 1 else loss
    grads = tape.gradient(loss, model.trainable_variables)
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, model.trainable_variables)], y_pred


def _step_outputs(model, x, y, y_pred, sw, deferred: bool):
    tf = import_tf()
    if deferred:
        model.compiled_metrics.update_state(y, y_pred, sw)
        # A placeholder output: Keras's multi-step loop (steps_per_execution) needs one, and with
        # reduction "first" (below) it is returned as it is, without a collective.
        return {DEFERRED_KEY: tf.zeros([])}
    return model.compute_metrics(x, y, y_pred, sw)


def make_train_step(model, accumulate_steps: int, grad_dtype: str, options: Any, deferred: bool):
    """``model``'s train step: K micro-batches, one all-reduce of their summed gradients."""
    tf = import_tf()
    keras = import_keras()

    def train_step(data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        if accumulate_steps == 1:
            grads, y_pred = _gradients(model, x, y, sw, 1)
        else:
            split = lambda t: None if t is None else tf.split(t, accumulate_steps)  # noqa: E731
            xs, ys, sws = split(x), split(y), split(sw)
            grads, preds = None, []
            for i in range(accumulate_steps):  # unrolled: K is small and fixed
                g, p = _gradients(model, xs[i], ys[i], None if sws is None else sws[i], 1.0 / accumulate_steps)
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
                preds.append(p)
            y_pred = tf.concat(preds, axis=0)
        variables = model.trainable_variables
        grads = all_reduce_gradients(grads, variables, grad_dtype, options)
        model.optimizer.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
        return _step_outputs(model, x, y, y_pred, sw, deferred)

    return train_step


def make_test_step(model):
    """``model``'s test step with deferred metrics (states only; read once per epoch)."""
    keras = import_keras()

    def test_step(data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = model(x, training=False)
        model.compute_loss(x, y, y_pred, sw)  # updates the loss metric
        return _step_outputs(model, x, y, y_pred, sw, True)

    return test_step


def has_deferred_metrics(model) -> bool:
    return bool(getattr(model, "_toolkit_deferred_metrics", False))


def metric_results(model) -> dict[str, float]:
    """Every compiled metric's result, aggregated over all workers (one collective per metric state;
    every worker must call it at the same point)."""
    with model.distribute_strategy.scope():
        return {m.name: float(m.result()) for m in model.metrics}
