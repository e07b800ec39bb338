"""The NN-NMR model: a Keras multilayer perceptron from a SOAP vector to a shift (ppm).

Training is data-parallel with Horovod: every rank holds the same training rows, takes its
1/size share of every global batch, the gradients are summed with ``hvd.allreduce`` (each
rank's loss is already divided by the GLOBAL batch count), the L2 gradient is added once in the
weight update, and the variables start from rank 0's by ``hvd.broadcast_variables``; so every
rank ends with the same weights.

Inference needs no TensorFlow: :class:`ShiftEnsemble` reads the fold models' plain arrays from
a run store, folds the feature and target standardisation into the first and last layers, and
predicts with float32 numpy GEMMs (the first layers of all models in one GEMM).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.context import RankContext, import_tensorflow

FEATURE_SCALE_FLOOR = 1e-6
"""Smallest feature standard deviation used for standardisation (constant features)."""


@dataclass
class FoldModel:
    """One trained network as plain arrays, with the standardisation it was trained with.

    Attributes
    ----------
    kernels, biases
        Layer weights, input to output; the last layer has one output (standardised shift).
    feature_mean, feature_scale
        Per-feature mean and standard deviation subtracted / divided before the first layer.
    target_mean_ppm, target_std_ppm
        The network predicts (shift_ppm - target_mean_ppm) / target_std_ppm.
    """

    kernels: list[np.ndarray]
    biases: list[np.ndarray]
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    target_mean_ppm: float
    target_std_ppm: float
    curves: dict = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0

    def folded(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """float32 kernels and biases that take RAW features to shifts in ppm."""
        kernels = [np.asarray(k, dtype=np.float64) for k in self.kernels]
        biases = [np.asarray(b, dtype=np.float64) for b in self.biases]
        scale = np.asarray(self.feature_scale, dtype=np.float64)
        mean = np.asarray(self.feature_mean, dtype=np.float64)
        biases[0] = biases[0] - (mean / scale) @ kernels[0]
        kernels[0] = kernels[0] / scale[:, None]
        kernels[-1] = kernels[-1] * self.target_std_ppm
        biases[-1] = biases[-1] * self.target_std_ppm + self.target_mean_ppm
        return ([k.astype(np.float32) for k in kernels], [b.astype(np.float32) for b in biases])

    def predict_ppm(self, features: np.ndarray) -> np.ndarray:
        """Shifts (ppm) of raw feature rows (numpy, float32)."""
        return ShiftEnsemble([self.folded()], {}).predict(features)[0]


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
    import keras

    schedule = keras.optimizers.schedules.InverseTimeDecay(
        spec.learning_rate, decay_steps=spec.lr_decay_epochs * steps_per_epoch,
        decay_rate=spec.lr_decay_rate)
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    optimizer.build(model.trainable_variables)
    if hvd is not None:
        hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
    size = ctx.size
    # the validated (and kept) weights: an exponential moving average of the epoch-end weights
    # (time constant spec.ema_epochs; it smooths the epoch-to-epoch noise of a small-batch
    # Adam run), or the trained weights themselves
    averaged, ema_decay, ema_weights = model, 0.0, None
    if spec.ema_epochs > 0:
        averaged = build_model(xs.shape[1], spec, seed)
        ema_weights = model.get_weights()
        averaged.set_weights(ema_weights)
        ema_decay = float(np.exp(-1.0 / spec.ema_epochs))

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

    val_rows = ctx.block(len(xv))

    def val_rmse_ppm() -> float:
        local = 0.0
        for start in range(val_rows.start, val_rows.stop, 4096):
            stop = min(start + 4096, val_rows.stop)
            pred = predict_step(tf.constant(xv[start:stop])).numpy() * target_std + target_mean
            local += float(np.sum((pred - yv_ppm[start:stop]) ** 2))
        total = ctx.comm.allreduce(local, op=MPI.SUM)
        return float(np.sqrt(total / max(len(xv), 1)))

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
        rmse = val_rmse_ppm()
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


def model_name(fold: int, member: int = 0) -> str:
    """Group name of a fold's network under ``/train/folds``: ``"3"`` for member 0 of fold 3,
    ``"3.1"`` for its member 1."""
    return f"{fold}" if member == 0 else f"{fold}.{member}"


def model_key(name: str) -> tuple[int, int]:
    """(fold, member) of a :func:`model_name`."""
    fold, _, member = str(name).partition(".")
    return int(fold), int(member or 0)


# ---- metrics --------------------------------------------------------------------------------


# ---- store I/O ------------------------------------------------------------------------------
def write_fold_model(store, group: str, model: FoldModel, dtype: str = "float32",
                     **attrs) -> None:
    """Write a fold model's arrays under `group` (collective; every rank holds the same)."""
    for i, (kernel, bias) in enumerate(zip(model.kernels, model.biases)):
        store.put(f"{group}/kernel_{i}", np.asarray(kernel, dtype=dtype))
        store.put(f"{group}/bias_{i}", np.asarray(bias, dtype=np.float32))
    store.put(f"{group}/feature_mean", np.asarray(model.feature_mean, dtype=np.float32))
    store.put(f"{group}/feature_scale", np.asarray(model.feature_scale, dtype=np.float32))
    store.set_attrs(group, n_layers=len(model.kernels), target_mean_ppm=model.target_mean_ppm,
                    target_std_ppm=model.target_std_ppm, best_epoch=model.best_epoch,
                    epochs_run=model.epochs_run, weights_dtype=dtype, **attrs)


def read_fold_model(store, group: str) -> FoldModel:
    """Read a fold model written by :func:`write_fold_model` (any rank, no communication)."""
    attrs = store.attrs(group)
    n_layers = int(attrs["n_layers"])
    return FoldModel(
        kernels=[store.read(f"{group}/kernel_{i}") for i in range(n_layers)],
        biases=[store.read(f"{group}/bias_{i}") for i in range(n_layers)],
        feature_mean=store.read(f"{group}/feature_mean"),
        feature_scale=store.read(f"{group}/feature_scale"),
        target_mean_ppm=float(attrs["target_mean_ppm"]),
        target_std_ppm=float(attrs["target_std_ppm"]),
        best_epoch=int(attrs.get("best_epoch", 0)), epochs_run=int(attrs.get("epochs_run", 0)))


class ShiftEnsemble:
    """The fold models of a trained store, predicting shifts (ppm) in plain numpy.

    Parameters
    ----------
    models
        Per model, (kernels, biases) already folded to take raw features to ppm.
    settings
        ``{"soap": {...}, "species": [...], "centre": "Na", ...}`` (the /train attributes).
    """

    def __init__(self, models: list[tuple[list[np.ndarray], list[np.ndarray]]], settings: dict,
                 chunk_rows: int = 8192):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.settings = settings
        self.chunk_rows = chunk_rows
        self.n_models = len(models)
        self._first_kernel = np.ascontiguousarray(
            np.concatenate([m[0][0] for m in models], axis=1), dtype=np.float32)
        self._first_bias = np.concatenate([m[1][0] for m in models]).astype(np.float32)
        self._widths = [m[0][0].shape[1] for m in models]
        self._rest = [([np.ascontiguousarray(k, np.float32) for k in m[0][1:]],
                       [np.asarray(b, np.float32) for b in m[1][1:]]) for m in models]

    @property
    def n_features(self) -> int:
        """Length of the SOAP vectors the models take."""
        return self._first_kernel.shape[0]

    @classmethod
    def from_store(cls, reader, group: str) -> "ShiftEnsemble":
        """Load every fold model under ``<group>/folds`` of an open store (use
        :func:`jobs.shiftmodels.registry.load_shift_model` to load a model of any kind)."""
        if not reader.exists(f"{group}/folds"):
            from engine.failure import InputError

            raise InputError(f"{getattr(reader, 'path', reader)}: no trained model "
                             f"(no {group}/folds); run the train stage first")
        folds = sorted(reader.keys(f"{group}/folds"), key=model_key)
        models = [read_fold_model(reader, f"{group}/folds/{k}").folded() for k in folds
                  if reader.attrs(f"{group}/folds/{k}").get("complete", True)]
        return cls(models, reader.attrs(group))

    def predict_all(self, features: np.ndarray) -> np.ndarray:
        """Every model's shifts (ppm), shape (n_models, n_rows), float32."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"features of shape {features.shape}; the model takes "
                             f"(n, {self.n_features})")
        out = np.empty((self.n_models, len(features)), dtype=np.float32)
        for start in range(0, len(features), self.chunk_rows):
            rows = features[start:start + self.chunk_rows]
            out[:, start:start + len(rows)] = self._predict_rows(rows)
        return out

    def _predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every model's shifts (ppm) of one block of rows, (n_models, n_rows): numpy GEMMs."""
        out = np.empty((self.n_models, len(rows)), dtype=np.float32)
        edges = np.cumsum([0] + self._widths)
        hidden_all = rows @ self._first_kernel
        hidden_all += self._first_bias
        np.maximum(hidden_all, 0.0, out=hidden_all)
        for m, (kernels, biases) in enumerate(self._rest):
            hidden = hidden_all[:, edges[m]:edges[m + 1]]
            for i, (kernel, bias) in enumerate(zip(kernels, biases)):
                hidden = hidden @ kernel
                hidden += bias
                if i < len(kernels) - 1:
                    np.maximum(hidden, 0.0, out=hidden)
            out[m] = hidden[:, 0]
        return out

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean shift (ppm) and spread (population std over models, ppm) per row."""
        every = self.predict_all(features)
        return every.mean(axis=0), every.std(axis=0)


class TfGemmEnsemble(ShiftEnsemble):
    """The same predictions as a :class:`ShiftEnsemble`, with TensorFlow's GEMMs.

    predict is FLOP-bound in one float32 GEMM: the first layers of all fold models at once
    (rows x n_features @ n_features x sum of widths). Which of numpy's BLAS and TensorFlow's
    CPU kernels is faster depends on the machine (OpenBLAS's kernel for the CPU, TensorFlow's
    oneDNN build), so the infer stage times both (:func:`choose_predictor`). Same weights (the
    ensemble's own folded float32 arrays), same layers; only the summation order of the
    float32 GEMM differs (rounding level). The traced function has a fixed input signature
    (any number of rows): it is traced once, whatever the chunk sizes.

    Parameters
    ----------
    ensemble
        A :class:`jobs.shiftmodels.nnmr.ShiftEnsemble` (its folded weights are read, not copied twice).
    threads
        TensorFlow intra-op threads (the rank's cores); ignored when TF already started.
    chunk_rows
        Rows per GEMM (bounds the hidden activations: rows x sum of widths x 4 bytes).
    """

    def __init__(self, ensemble, threads: int = 1, chunk_rows: int = 4096):
        tf = import_tensorflow()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, int(threads)))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TF already started its pools (e.g. the train stage ran)
            pass
        self.__dict__.update(ensemble.__dict__)  # the same folded arrays and settings
        self._tf = tf
        self.ensemble = ensemble
        self.chunk_rows = chunk_rows
        edges = np.cumsum([0] + list(ensemble._widths))
        first_kernel = tf.constant(ensemble._first_kernel)
        first_bias = tf.constant(ensemble._first_bias)
        rest = [([tf.constant(k) for k in kernels], [tf.constant(b) for b in biases])
                for kernels, biases in ensemble._rest]

        @tf.function(input_signature=[tf.TensorSpec([None, ensemble.n_features], tf.float32)])
        def every_model(rows):
            hidden_all = tf.nn.relu(tf.matmul(rows, first_kernel) + first_bias)
            outputs = []
            for m, (kernels, biases) in enumerate(rest):
                hidden = hidden_all[:, int(edges[m]):int(edges[m + 1])]
                for i, (kernel, bias) in enumerate(zip(kernels, biases)):
                    hidden = tf.matmul(hidden, kernel) + bias
                    if i < len(kernels) - 1:
                        hidden = tf.nn.relu(hidden)
                outputs.append(hidden[:, 0])
            return tf.stack(outputs)

        self._every_model = every_model

    def _predict_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._every_model(self._tf.constant(rows)).numpy()


def fast_predictor(ensemble, threads: int = 1):
    """:class:`TfGemmEnsemble` of a ShiftEnsemble when TensorFlow imports, runs eagerly and
    agrees with the ensemble on a probe, else the ensemble itself; any other object (a
    stand-in with ``predict``) is returned unchanged."""
    if not isinstance(ensemble, ShiftEnsemble):
        return ensemble
    try:
        tf = import_tensorflow()
        if not tf.executing_eagerly():  # TF1 graph mode switched on by another stage
            return ensemble
        fast = TfGemmEnsemble(ensemble, threads)
        probe = np.random.default_rng(0).random((4, ensemble.n_features), dtype=np.float32)
        if not np.allclose(fast.predict_all(probe), ensemble.predict_all(probe),
                           rtol=1e-5, atol=1e-2):
            return ensemble
        return fast
    except ImportError:
        return ensemble


# ---- the predictor, chosen by timing ---------------------------------------------------------
PREDICTORS = ("numpy", "tensorflow")
"""Names of infer's predictors: :class:`ShiftEnsemble` (numpy / its BLAS) and
:class:`TfGemmEnsemble` (TensorFlow's GEMMs)."""


@dataclass(frozen=True)
class PredictorChoice:
    """Which predictor infer uses, and the timings it was chosen by."""

    name: str
    """One of :data:`PREDICTORS` (the class name of a model that has no choice, e.g. GPR)."""
    numpy_ms_per_frame: float
    """Wall time of the numpy predictor per frame (ms; best of the repeats, mean over ranks;
    NaN when not timed)."""
    tensorflow_ms_per_frame: float
    """The same for TensorFlow (NaN when not timed or TensorFlow is unavailable)."""
    rows: int
    """Feature rows of the timed batch (frames x target nuclei per frame)."""
    source: str
    """``timed`` (chosen now), ``recorded`` (taken from the store: a resumed run predicts
    with the predictor its first start chose, so its numbers match to the last digit) or
    ``fixed`` (a model that is no ShiftEnsemble predicts itself)."""

    def log_line(self) -> str:
        """One line for the run log."""
        timing = (f"numpy {self.numpy_ms_per_frame:.2f} ms/frame, TensorFlow "
                  f"{self.tensorflow_ms_per_frame:.2f} ms/frame" if self.source == "timed"
                  else f"recorded in the store (timed then: numpy "
                       f"{self.numpy_ms_per_frame:.2f}, TensorFlow "
                       f"{self.tensorflow_ms_per_frame:.2f} ms/frame)")
        return f"predictor {self.name}: {timing}, {self.rows} rows per timed batch"

    def attrs(self) -> dict:
        """Store attributes (see :func:`choose_predictor`)."""
        return {"predictor": self.name,
                "predictor_numpy_ms_per_frame": float(self.numpy_ms_per_frame),
                "predictor_tensorflow_ms_per_frame": float(self.tensorflow_ms_per_frame),
                "predictor_timed_rows": int(self.rows)}


def predictor_ms_per_call(predictors: dict, rows: np.ndarray, repeats: int = 5) -> dict:
    """Best wall time (ms) of ``predict(rows)`` of each named predictor over `repeats` calls.

    One predictor after the other, each called once untimed first (TensorFlow traces its
    function, BLAS allocates its buffers, and the other's thread pool stops spinning); not
    interleaved, since both pools spin a while after a call and would slow the other down.
    """
    best = {}
    for name, predictor in predictors.items():
        predictor.predict(rows)
        seconds = np.inf
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            predictor.predict(rows)
            seconds = min(seconds, time.perf_counter() - start)
        best[name] = 1e3 * seconds
    return best


def choose_predictor(ensemble, ctx: RankContext, rows_per_frame: int, frames: int = 32,
                     repeats: int = 5, recorded: dict | None = None):
    """The faster of infer's two predictors on this machine, the same on every rank.

    Every rank times both on the same batch (`frames` frames of `rows_per_frame` random
    feature rows: the real feature count, a realistic GEMM), the timings are averaged over
    the ranks (collective on ``ctx.comm``) and the faster predictor is taken. With
    `recorded` (the attributes :meth:`PredictorChoice.attrs` of an earlier start of this
    run), its predictor is reused without timing, so a resumed run predicts with the same
    GEMMs (the two agree to float32 rounding only). TensorFlow is skipped when it does not
    import, runs in graph mode, or disagrees with numpy on a probe (:func:`fast_predictor`).

    Returns
    -------
    (predictor, PredictorChoice)
        The predictor (a ShiftEnsemble or a TfGemmEnsemble) and how it was chosen.
        A model that is no ShiftEnsemble (GPR, a test stand-in) is returned unchanged, not
        timed (source ``fixed``).
    """
    from mpi4py import MPI

    nan = float("nan")
    rows = max(1, int(rows_per_frame)) * max(1, int(frames))
    if not isinstance(ensemble, ShiftEnsemble):
        return ensemble, PredictorChoice(type(ensemble).__name__, nan, nan, 0, "fixed")
    if recorded and recorded.get("predictor") in PREDICTORS:
        name = recorded["predictor"]
        predictor = ensemble if name == "numpy" else fast_predictor(ensemble, ctx.cores)
        if name == "tensorflow" and predictor is ensemble:
            ctx.warn("infer: the store records the TensorFlow predictor, which is unavailable "
                     "now; predicting with numpy (shifts may differ in the last digits)")
            name = "numpy"
        return predictor, PredictorChoice(
            name, float(recorded.get("predictor_numpy_ms_per_frame", nan)),
            float(recorded.get("predictor_tensorflow_ms_per_frame", nan)),
            int(recorded.get("predictor_timed_rows", 0)), "recorded")
    batch = np.random.default_rng(0).random((rows, ensemble.n_features), dtype=np.float32)
    candidates = {"numpy": ensemble}
    fast = fast_predictor(ensemble, ctx.cores)
    if fast is not ensemble:
        candidates["tensorflow"] = fast
    timed = predictor_ms_per_call(candidates, batch, repeats)
    # 0 for "unavailable" on a rank: any rank without TensorFlow makes the choice numpy
    local = [timed.get(name, 0.0) for name in PREDICTORS]
    available = ctx.comm.allreduce(len(candidates), op=MPI.MIN) == len(PREDICTORS)
    totals = ctx.comm.allreduce(np.asarray(local, dtype=np.float64), op=MPI.SUM)
    per_frame = [float(t) / ctx.size / frames for t in totals]
    if not available:
        per_frame[1] = nan
    name = "tensorflow" if available and per_frame[1] < per_frame[0] else "numpy"
    name = ctx.comm.bcast(name, root=0)
    return candidates.get(name, ensemble), PredictorChoice(name, per_frame[0], per_frame[1],
                                                           rows, "timed")


