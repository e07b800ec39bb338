"""Regression metrics of predicted against reference shifts (RMSE, MAE, R2)."""
from __future__ import annotations

import numpy as np


def regression_metrics(y_true_ppm: np.ndarray, y_pred_ppm: np.ndarray) -> dict[str, float]:
    """RMSE (ppm), MAE (ppm) and coefficient of determination R2 of predictions."""
    y_true = np.asarray(y_true_ppm, dtype=np.float64)
    error = np.asarray(y_pred_ppm, dtype=np.float64) - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    return {"rmse_ppm": float(np.sqrt(np.mean(error ** 2))),
            "mae_ppm": float(np.mean(np.abs(error))),
            "r2": float(1.0 - np.sum(error ** 2) / ss_tot) if ss_tot > 0 else float("nan")}
