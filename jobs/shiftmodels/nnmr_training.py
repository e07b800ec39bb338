"""Training the NN-NMR model: a Keras multilayer perceptron from a SOAP vector to a shift (ppm).

Training is data-parallel with Horovod: every rank holds the same training rows, takes its
1/size share of every global batch, the gradients are summed with ``hvd.allreduce`` (each
rank's loss is already divided by the GLOBAL batch count), the L2 gradient is added once in the
weight update, and the variables start from rank 0's by ``hvd.broadcast_variables``; so every
rank ends with the same weights. The result is a :class:`jobs.shiftmodels.nnmr.FoldModel`.
"""
from __future__ import annotations

import time

import numpy as np

from engine.context import RankContext, import_tensorflow
from jobs.shiftmodels.nnmr import FoldModel

FEATURE_SCALE_FLOOR = 1e-6
"""Smallest feature standard deviation used for standardisation (constant features)."""


# ---- Horovod ------------------------------------------------------------------------------
_HOROVOD_COMM_SIZE: int | None = None


def init_horovod(ctx: RankContext):
    """Initialise Horovod on ``ctx.comm`` once per process; returns ``horovod.tensorflow``.

    Also sizes TensorFlow's thread pools to the rank's cores.
    """
    global _HOROVOD_COMM_SIZE
    tf = import_tensorflow()
    import horovod.tensorflow as hvd

    if _HOROVOD_COMM_SIZE is None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(ctx.cores)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TF already started its pools
            pass
        hvd.init(comm=ctx.comm)
        _HOROVOD_COMM_SIZE = hvd.size()
    if hvd.size() != ctx.size or hvd.rank() != ctx.rank:
        raise RuntimeError(f"horovod was initialised on a communicator of size {hvd.size()}; "
                           f"this stage runs on one of size {ctx.size} (one per process)")
    return hvd


def build_model(n_features: int, spec, seed: int):
    """The Keras network: hidden relu layers with dropout, one linear output. (The L2 penalty
    on every kernel is applied by :func:`train_model` as its gradient, in the weight update.)

    Parameters
    ----------
    n_features
        Length of a SOAP vector.
    spec
        A :class:`schemas.train.TrainSpec` (hidden_units, dropout).
    seed
        Seed of the initial weights and the dropout masks.
    """
    import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input(shape=(n_features,))]
    for units in spec.hidden_units:
        layers.append(keras.layers.Dense(units, activation="relu"))
        if spec.dropout > 0:
            layers.append(keras.layers.Dropout(spec.dropout))
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


def feature_standardisation(x: np.ndarray, standardise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of training rows `x` (zeros / ones when not standardising)."""
    if not standardise:
        return (np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32))
    mean = x.mean(axis=0, dtype=np.float64)
    scale = np.sqrt(np.maximum(x.var(axis=0, dtype=np.float64), 0.0))
    return mean.astype(np.float32), np.maximum(scale, FEATURE_SCALE_FLOOR).astype(np.float32)


def train_model(x_train: np.ndarray, y_train_ppm: np.ndarray, x_val: np.ndarray,
                y_val_ppm: np.ndarray, spec, ctx: RankContext, seed: int,
                log_prefix: str = "train") -> FoldModel:
    """Train one network data-parallel over the ranks of `ctx` (Horovod).

    Parameters
    ----------
    x_train, y_train_ppm
        Training rows (raw SOAP vectors) and their shifts (ppm), identical on every rank.
    x_val, y_val_ppm
        Validation rows for early stopping (other FRAMES than the training rows).
    spec
        A :class:`schemas.train.TrainSpec`.
    ctx
        The rank context; Horovod is initialised on ``ctx.comm``.
    seed
        Seed of the weights, dropout and batch order (identical on every rank).

    Returns
    -------
    FoldModel
        The best-validation weights (identical on every rank), standardisation and curves.
    """
    tf = import_tensorflow()

    from mpi4py import MPI

    hvd = init_horovod(ctx) if ctx.size > 1 else None
    feature_mean, feature_scale = feature_standardisation(x_train, spec.standardise_features)
    target_mean = float(np.mean(y_train_ppm))
    target_std = float(np.std(y_train_ppm)) or 1.0

    def standardise(x):
        out = np.asarray(x, dtype=np.float32) - feature_mean
        out /= feature_scale
        return out

    xs = standardise(x_train)
    ys = ((np.asarray(y_train_ppm, np.float64) - target_mean) / target_std).astype(np.float32)
    xv = standardise(x_val)
    yv_ppm = np.asarray(y_val_ppm, dtype=np.float64)

    model = build_model(xs.shape[1], spec, seed)
    n_rows = len(xs)
    steps_per_epoch = max(1, -(-n_rows // spec.batch_size))
    schedule, optimizer = _adam_with_decay(model, spec, steps_per_epoch)
    if hvd is not None:
        hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
    size = ctx.size
    averaged, ema_decay, ema_weights = _weight_average(model, xs.shape[1], spec, seed)
    train_step, predict_step, sse_epoch = _step_functions(model, averaged, optimizer, xs, ys,
                                                          spec, hvd)
    rng = np.random.default_rng(seed)
    curves = {"train_mse_std": [], "val_rmse_ppm": [], "learning_rate": [], "epoch_s": []}
    best = (np.inf, 0, [v.numpy() for v in averaged.trainable_variables])
    started = time.monotonic()
    epoch = 0
    for epoch in range(1, spec.epochs + 1):
        epoch_started = time.monotonic()
        order = rng.permutation(n_rows)
        sse_epoch.assign(0.0)
        for step in range(steps_per_epoch):
            batch = order[step * spec.batch_size:(step + 1) * spec.batch_size]
            mine = np.sort(batch[ctx.rank::size])
            train_step(tf.constant(mine, tf.int64), tf.constant(float(len(batch)), tf.float32))
        train_mse = ctx.comm.allreduce(float(sse_epoch.numpy()), op=MPI.SUM) / n_rows
        if ema_weights is not None:
            for average, current in zip(ema_weights, model.get_weights()):
                average *= ema_decay
                average += (1.0 - ema_decay) * current
            averaged.set_weights(ema_weights)
        curves["epoch_s"].append(time.monotonic() - epoch_started)  # training steps only
        rmse = _validation_rmse_ppm(predict_step, xv, yv_ppm, target_mean, target_std, ctx)
        lr = float(schedule(optimizer.iterations))
        curves["train_mse_std"].append(train_mse)
        curves["val_rmse_ppm"].append(rmse)
        curves["learning_rate"].append(lr)
        if rmse < best[0]:
            best = (rmse, epoch, [v.numpy() for v in averaged.trainable_variables])
        if epoch % 10 == 0 or epoch == 1:
            ctx.log(f"{log_prefix}: epoch {epoch}/{spec.epochs}, train mse {train_mse:.4f} "
                    f"(std units), val rmse {rmse:.1f} ppm (best {best[0]:.1f} @ {best[1]}), "
                    f"lr {lr:.2e}, {time.monotonic() - started:.0f} s")
        if epoch - best[1] >= spec.patience_epochs:
            break
    weights = best[2]
    return FoldModel(kernels=weights[0::2], biases=weights[1::2], feature_mean=feature_mean,
                     feature_scale=feature_scale, target_mean_ppm=target_mean,
                     target_std_ppm=target_std,
                     curves={k: np.asarray(v) for k, v in curves.items()},
                     best_epoch=best[1], epochs_run=epoch)


def _adam_with_decay(model, spec, steps_per_epoch: int):
    """Adam with inverse-time decay of its learning rate (``lr_decay_rate`` every
    ``lr_decay_epochs`` epochs), built for `model`'s variables; returns (schedule, optimizer)."""
    import keras

    schedule = keras.optimizers.schedules.InverseTimeDecay(
        spec.learning_rate, decay_steps=spec.lr_decay_epochs * steps_per_epoch,
        decay_rate=spec.lr_decay_rate)
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    optimizer.build(model.trainable_variables)
    return schedule, optimizer


def _weight_average(model, n_features: int, spec, seed: int):
    """The network whose weights are validated and kept, and how it follows `model`.

    An exponential moving average of the epoch-end weights (time constant ``spec.ema_epochs``;
    it smooths the epoch-to-epoch noise of a small-batch Adam run): a second network, the
    decay per epoch and the averaged weights; or, with ``ema_epochs`` 0, the trained network
    itself, 0.0 and None.
    """
    averaged, ema_decay, ema_weights = model, 0.0, None
    if spec.ema_epochs > 0:
        averaged = build_model(n_features, spec, seed)
        ema_weights = model.get_weights()
        averaged.set_weights(ema_weights)
        ema_decay = float(np.exp(-1.0 / spec.ema_epochs))
    return averaged, ema_decay, ema_weights


def _step_functions(model, averaged, optimizer, xs: np.ndarray, ys: np.ndarray, spec, hvd):
    """The traced TensorFlow functions of a training run: (train_step, predict_step,
    sse_epoch).

    ``train_step(rows, n_global)`` takes one rank's rows of a global batch (indices into the
    standardised training rows `xs`, `ys`) and the global batch length, sums the gradients over
    the ranks (Horovod, when `hvd` is given) and updates the weights; it adds the batch's
    squared error to the variable ``sse_epoch``. ``predict_step(x)`` predicts with `averaged`.
    """
    tf = import_tensorflow()
    # the training rows live in TensorFlow once; a step gathers its rows in the graph (no
    # numpy copy + host-to-tensor copy per step) and the epoch's squared error is summed in a
    # variable, read once per epoch (no synchronisation per step)
    x_all, y_all = tf.constant(xs), tf.constant(ys)
    sse_epoch = tf.Variable(0.0, dtype=tf.float64, trainable=False)

    # L2 on every kernel: the gradient of l2_lambda * sum(w^2) is 2 * l2_lambda * w, added once
    # to the summed data gradient inside the (fused) update, not computed on the tape
    decay = [2.0 * spec.l2_lambda if len(v.shape) == 2 else 0.0
             for v in model.trainable_variables]

    @tf.function(jit_compile=spec.xla_optimizer_update)
    def apply_step(grads):
        grads = [g + c * v if c else g
                 for g, c, v in zip(grads, decay, model.trainable_variables)]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    # fixed signatures (any batch length): each function is traced once per training run
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64),
                                  tf.TensorSpec([], tf.float32)])
    def train_step(rows, n_global):
        xb, yb = tf.gather(x_all, rows), tf.gather(y_all, rows)
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)[:, 0]
            sse = tf.reduce_sum(tf.square(pred - yb))
            loss = sse / n_global
        grads = tape.gradient(loss, model.trainable_variables)
        if hvd is not None:
            grads = hvd.grouped_allreduce(grads, op=hvd.Sum)
        apply_step(grads)
        sse_epoch.assign_add(tf.cast(sse, tf.float64))

    @tf.function(input_signature=[tf.TensorSpec([None, xs.shape[1]], tf.float32)])
    def predict_step(xb):
        return averaged(xb, training=False)[:, 0]

    return train_step, predict_step, sse_epoch


def _validation_rmse_ppm(predict_step, xv: np.ndarray, yv_ppm: np.ndarray, target_mean: float,
                         target_std: float, ctx: RankContext) -> float:
    """RMSE (ppm) of the validation rows (standardised features `xv`, shifts `yv_ppm`), each
    rank predicting its block of them (collective: one allreduce)."""
    tf = import_tensorflow()
    from mpi4py import MPI

    val_rows = ctx.block(len(xv))
    local = 0.0
    for start in range(val_rows.start, val_rows.stop, 4096):
        stop = min(start + 4096, val_rows.stop)
        pred = predict_step(tf.constant(xv[start:stop])).numpy() * target_std + target_mean
        local += float(np.sum((pred - yv_ppm[start:stop]) ** 2))
    total = ctx.comm.allreduce(local, op=MPI.SUM)
    return float(np.sqrt(total / max(len(xv), 1)))
