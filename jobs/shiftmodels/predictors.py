"""Infer's fast predictors of a :class:`jobs.shiftmodels.nnmr.ShiftEnsemble`: the same
GEMMs in TensorFlow (:class:`TfGemmEnsemble`), and the choice between numpy's and
TensorFlow's by timing them on every rank (:func:`choose_predictor`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.context import RankContext, import_tensorflow
from jobs.shiftmodels.nnmr import ShiftEnsemble


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
