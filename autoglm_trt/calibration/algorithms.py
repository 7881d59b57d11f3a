"""Per-tensor amax from a histogram of |x| over [0, hi]: max, percentile, or entropy (TensorRT's KL).

Entropy is the algorithm behind TensorRT's EntropyCalibration2: for every candidate clip bin i
(128 .. 2048), the reference distribution P is the first i bins with everything beyond folded into
bin i-1; Q is P's first i bins merged into 128 quantization levels and expanded back (each level's
mass spread evenly over its non-empty bins); the chosen amax is the edge of the i minimising
KL(P || Q).
"""

from __future__ import annotations

import numpy as np

METHODS = ("max", "percentile", "entropy")
QUANT_LEVELS = 128  # int8, symmetric: |q| in [0, 127]


def amax_from_histogram(hist: np.ndarray, hi: float, method: str, percentile: float = 99.99) -> float:
    """hist [bins] counts of |x| over [0, hi] -> amax for the method."""
    hist = np.asarray(hist, dtype=np.float64)
    if method == "max" or hist.sum() == 0 or hi <= 0:
        return float(hi)
    width = hi / len(hist)
    if method == "percentile":
        return percentile_amax(hist, width, percentile)
    if method == "entropy":
        return entropy_amax(hist, width)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def percentile_amax(hist: np.ndarray, width: float, percentile: float) -> float:
    """Upper edge of the first bin where the cumulative share of |x| reaches `percentile` %."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    cdf = np.cumsum(hist) / hist.sum()
    idx = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12))
    return float(min(idx + 1, len(hist)) * width)


def entropy_amax(hist: np.ndarray, width: float, levels: int = QUANT_LEVELS) -> float:
    """TensorRT's KL-divergence calibration (see the module docstring)."""
    n = len(hist)
    if n <= levels:
        return float(n * width)
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = hist[i:].sum()
    nonzero = (hist > 0).astype(np.float64)
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        kl = _kl_for_clip(hist[:i], nonzero[:i], tail[i], levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(best_i * width)


def _kl_for_clip(head: np.ndarray, nonzero: np.ndarray, outliers: float, levels: int) -> float:
    i = len(head)
    p = head.copy()
    p[-1] += outliers  # clipped values saturate into the last kept bin
    group = (np.arange(i) * levels) // i  # [i] quantization level of each bin
    sums = np.bincount(group, weights=head, minlength=levels)
    counts = np.bincount(group, weights=nonzero, minlength=levels)
    q = nonzero * (sums / np.maximum(counts, 1.0))[group]  # expand: spread evenly over non-empty bins
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    q = np.where(mask & (q == 0), 1e-12, q)  # NOTE: smoothing, as TensorRT does, instead of infinity
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
