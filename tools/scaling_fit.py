"""Scaling-law fits for the study (imported by tools/study_report.py; numpy + scipy).

Full precision, per optimizer (Hoffmann et al. at a fixed tokens-per-parameter ratio):
    L(N) = A / N^alpha + E
Quantized (QAT) runs, with the same optimizer's A, alpha, E held fixed (Kumar et al.'s
precision-aware form): the quantized model behaves like one of rho * N parameters,
    L_q(N) = A / (rho N)^alpha + E
so rho < 1 is the fraction of its parameters a quantized model is worth. Confidence intervals
are 95% (1.96 standard errors from the fit's covariance; with few points they are wide and
say so).
"""
import numpy as np
from scipy.optimize import curve_fit


def fit_power_law(n, loss):
    """Fits L = A / N^alpha + E; returns dict(A, alpha, E, cov) or None when it does not converge."""
    n = np.asarray(n, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if len(n) < 3:
        return None
    scale = n.min()
    x = n / scale  # fit in units of the smallest model for conditioning

    def model(x, a, alpha, e):
        return a / np.power(x, alpha) + e

    p0 = (max(loss[0] - loss.min() + 0.1, 0.1), 0.3, max(loss.min() - 0.1, 0.0))
    try:
        params, cov = curve_fit(model, x, loss, p0=p0, bounds=([0, 0, 0], [np.inf, 3.0, np.inf]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    a, alpha, e = params
    # A in units of raw parameter counts: A' = a * scale^alpha
    return {"A": a * scale ** alpha, "alpha": alpha, "E": e, "cov": cov, "scale": scale, "a_scaled": a,
            "stderr": np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else [np.nan] * 3}


def predict(fit, n):
    return fit["a_scaled"] / np.power(np.asarray(n, dtype=float) / fit["scale"], fit["alpha"]) + fit["E"]


def fit_rho(fit, n, loss):
    """rho of quantized runs given the full-precision fit; returns (rho, ci_low, ci_high)."""
    n = np.asarray(n, dtype=float) / fit["scale"]
    loss = np.asarray(loss, dtype=float)

    def model(x, rho):
        return fit["a_scaled"] / np.power(rho * x, fit["alpha"]) + fit["E"]

    try:
        params, cov = curve_fit(model, n, loss, p0=(0.8,), bounds=([1e-3], [10.0]))
    except (RuntimeError, ValueError):
        return None
    rho = params[0]
    err = float(np.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else float("nan")
    return rho, rho - 1.96 * err, rho + 1.96 * err
