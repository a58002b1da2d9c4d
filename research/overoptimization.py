"""Reward-model over-optimisation curves: Gao et al. (2022)'s functional forms, fitted.

Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization", eq. 1-2:
with d = √KL(π ‖ π_init) (KL in nats), the gold reward gained over the initial policy is

  best-of-n   R_bon(d) = d (α − β d)            peak at d* = α / (2β), R* = α² / (4β)
  RL          R_rl(d)  = d (α − β log d)        peak at d* = exp(α/β − 1), R* = β d*

Both forms are linear in (α, β), so the least-squares fit through the origin is exact
linear algebra: R ≈ α·x₁ + β·x₂ with x₁ = d and x₂ = −d² (best-of-n) or −d log d (RL;
d log d → 0 at d = 0). Intervals come from a bootstrap: curves (one per seed) resampled
with replacement when there are at least `min_groups_for_seeds` of them, else the points
(checkpoints) pooled over curves. Pure numpy: arrays in, dicts out.
"""
from typing import Optional, Sequence

import numpy as np

FORMS = ('bon', 'rl')


def _features(form: str, d) -> np.ndarray:
  """N×2 design matrix [x₁, x₂] of the form at d (float64)."""
  d = np.asarray(d, np.float64)
  if form == 'bon':
    return np.stack([d, -d * d], axis=1)
  if form == 'rl':
    safe = np.where(d > 0, d, 1.0)
    return np.stack([d, -np.where(d > 0, d * np.log(safe), 0.0)], axis=1)
  raise ValueError(f'form={form!r}: expected one of {FORMS}')


def predict(form: str, alpha: float, beta: float, d) -> np.ndarray:
  """R(d) of the form (float64, same shape as d); d >= 0 is √KL in nats^½."""
  return _features(form, np.ravel(d)) @ np.asarray([alpha, beta], np.float64)


def peak(form: str, alpha: float, beta: float) -> tuple[float, float]:
  """(d*, R*) where the form is largest: ∞ (and R* = ∞) when β <= 0 (no peak)."""
  if beta <= 0:
    return float('inf'), float('inf')
  if form == 'bon':
    return alpha / (2 * beta), alpha * alpha / (4 * beta)
  if form == 'rl':
    d = float(np.exp(min(alpha / beta - 1.0, 700.0)))
    return d, beta * d
  raise ValueError(f'form={form!r}: expected one of {FORMS}')


def fit(form: str, d, gain) -> dict:
  """Least-squares (α, β) of `form` through the points (d, gain).

  d: √KL per point, float N (>= 0); gain: gold reward minus its value at d = 0, float N.
  -> {alpha, beta, d_peak, gain_peak, rmse, n}. Raises ValueError for fewer than 2 points
  with d > 0 or mismatched shapes.
  """
  d, gain = np.asarray(d, np.float64).ravel(), np.asarray(gain, np.float64).ravel()
  if d.shape != gain.shape:
    raise ValueError(f'd and gain differ in shape: {d.shape} vs {gain.shape}')
  if np.count_nonzero(d > 0) < 2:
    raise ValueError(f'{np.count_nonzero(d > 0)} points with d > 0: a fit needs 2')
  x = _features(form, d)
  (alpha, beta), *_ = np.linalg.lstsq(x, gain, rcond=None)
  d_peak, gain_peak = peak(form, float(alpha), float(beta))
  rmse = float(np.sqrt(np.mean((x @ np.array([alpha, beta]) - gain) ** 2)))
  return dict(alpha=float(alpha), beta=float(beta), d_peak=d_peak, gain_peak=gain_peak,
              rmse=rmse, n=int(len(d)))


def bootstrap_fit(form: str, curves: Sequence[tuple], num_samples: int = 2000, seed: int = 0,
                  confidence: float = 0.95, min_groups_for_seeds: int = 3) -> dict:
  """`fit` on all points of `curves` plus percentile bootstrap intervals.

  curves: [(d float N_i, gain float N_i)], one per seed. Resamples whole curves (unit
  'seeds') when there are >= min_groups_for_seeds, else single points of the pooled
  curves (unit 'points'); resamples whose fit is impossible (< 2 points with d > 0) are
  redrawn. -> fit's dict + {alpha_interval, beta_interval, d_peak_interval: (lo, hi),
  unit, samples, curves}.
  """
  if not curves:
    raise ValueError('no curves to fit')
  pooled_d = np.concatenate([np.asarray(c[0], np.float64).ravel() for c in curves])
  pooled_g = np.concatenate([np.asarray(c[1], np.float64).ravel() for c in curves])
  point = fit(form, pooled_d, pooled_g)
  rng = np.random.default_rng(seed)
  by_seed = len(curves) >= min_groups_for_seeds
  draws = []
  attempts = 0
  while len(draws) < num_samples and attempts < 10 * num_samples:
    attempts += 1
    if by_seed:
      pick = rng.integers(0, len(curves), len(curves))
      d = np.concatenate([np.asarray(curves[i][0], np.float64).ravel() for i in pick])
      g = np.concatenate([np.asarray(curves[i][1], np.float64).ravel() for i in pick])
    else:
      pick = rng.integers(0, len(pooled_d), len(pooled_d))
      d, g = pooled_d[pick], pooled_g[pick]
    if np.count_nonzero(d > 0) < 2:
      continue
    f = fit(form, d, g)
    draws.append((f['alpha'], f['beta'], f['d_peak']))
  lo_q, hi_q = 50 * (1 - confidence), 50 * (1 + confidence)
  # Order statistics, not interpolation: a peak is ∞ in draws where β <= 0.
  interval = lambda v: (float(np.percentile(v, lo_q, method='inverted_cdf')),
                        float(np.percentile(v, hi_q, method='inverted_cdf')))
  arr = np.asarray(draws, np.float64)
  return dict(point, alpha_interval=interval(arr[:, 0]), beta_interval=interval(arr[:, 1]),
              d_peak_interval=interval(arr[:, 2]), unit='seeds' if by_seed else 'points',
              samples=len(draws), curves=len(curves))


def peaks_then_falls(d, values, tolerance: float = 0.0) -> Optional[bool]:
  """Whether a measured curve rises to an interior maximum and ends below it.

  d, values: float N (sorted by d inside). True when the largest value is neither at the
  smallest nor the largest d and the last value is more than `tolerance` below it; None
  for fewer than 3 points.
  """
  d, values = np.asarray(d, np.float64), np.asarray(values, np.float64)
  if len(d) < 3:
    return None
  order = np.argsort(d, kind='stable')
  v = values[order]
  top = int(np.argmax(v))
  return bool(0 < top < len(v) - 1 and v[-1] < v[top] - tolerance)
