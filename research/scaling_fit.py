"""Scaling-law fits: IsoFLOP parabolas (approach 2) and L(N, D) = E + A/N^α + B/D^β (approach 3).

Hoffmann et al. 2022 ("Chinchilla"), with the fitting details of Besiroglu et al. 2024:
  approach 2  per budget C, a parabola of loss in ln N; its vertex is N_opt(C), and
              N_opt ∝ C^a, D_opt ∝ C^b by least squares in log-log. A budget whose best
              run is its smallest or largest model only bounds the optimum: flagged, left out.
  approach 3  minimise Σ Huber_δ(LSE(a − α ln N, b − β ln D, e) − ln L) over
              θ = (a, b, e, α, β) = (ln A, ln B, ln E, α, β) with L-BFGS from a grid of
              starts; intervals by bootstrap over runs. With C = k·N·D the compute-optimal
              N_opt = G (C/k)^a, D_opt = (C/k)^b / G, G = (αA / βB)^(1/(α+β)), a = β/(α+β).
Pure numpy/scipy: arrays in, dataclasses and dicts out.
"""
import dataclasses
import itertools
import math
import os
from typing import Optional, Sequence

import numpy as np

# scipy's L-BFGS-B calls its own OpenBLAS on 10×10 matrices; with worker threads on a busy
# 2-core machine every call waited milliseconds for them (fits ran 5–50× slower). Read once,
# when scipy loads its OpenBLAS, so it must precede the import.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
import scipy.optimize  # pylint: disable=g-import-not-at-top
import scipy.stats

# --------------------------------------------------------------------------------------
# A table of runs (dicts, e.g. CSV rows): which rows can be fitted.


def row_name(rows, i) -> str:
  """'row 3 (line 4)': the i-th (0-based) row, 1-based, with its CSV line when the row has
  one (`_line`, as experiments.scaling_fit.read_runs records it)."""
  line = rows[i].get('_line')
  return f'row {i + 1}' + (f' (line {line})' if line else '')


def usable_runs(rows) -> tuple[dict, list, list]:
  """(table, used, dropped) of a table of runs (dicts of strings or numbers).

  table: float64 arrays N (parameters), D (tokens), loss (nats/token) and C (FLOPs, only
  when every row has one), of the rows whose values are all positive finite numbers;
  used: the indices of those rows; dropped: (row index, reason) for each row left out,
  e.g. (3, "N='-1e6' is not positive") — missing, not a number, not finite, not positive.
  """
  keys = ['N', 'D', 'loss'] + (['C'] if all(r.get('C') for r in rows) else [])
  used, dropped = [], []
  for i, row in enumerate(rows):
    problems = [f'{k}={row.get(k)!r} is {p}' for k in keys if (p := _problem(row.get(k)))]
    if problems:
      dropped.append((i, '; '.join(problems)))
    else:
      used.append(i)
  table = {k: np.array([float(rows[i][k]) for i in used]) for k in keys}
  return table, used, dropped


def _problem(text) -> str:
  """What is wrong with a cell that must hold a positive number ('' when nothing)."""
  if text is None or not str(text).strip():
    return 'missing'
  try:
    x = float(text)
  except ValueError:
    return 'not a number'
  if not math.isfinite(x):
    return 'not finite'
  return '' if x > 0 else 'not positive'


# --------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas.


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  """One budget's parabola loss = c2·x² + c1·x + c0 in x = ln N, and its vertex."""
  budget: float
  coeffs: tuple  # (c2, c1, c0); NaNs when fewer than 3 sizes
  n_opt: float
  d_opt: float
  loss_opt: float
  edge: bool  # True: the optimum is not bracketed by the grid; left out of the power laws
  reason: str
  num_runs: int


def fit_isoflop(budget: float, n, d, loss) -> IsoFlopFit:
  """Parabola in ln N through one budget's runs; flags optima at (or past) the grid edge."""
  x, y = np.log(np.asarray(n, float)), np.asarray(loss, float)
  ln_d = np.log(np.asarray(d, float))
  nan = float('nan')
  if len(np.unique(x)) < 3:
    return IsoFlopFit(budget, (nan, nan, nan), nan, nan, nan, True,
                      f'{len(np.unique(x))} sizes (a parabola needs 3)', len(x))
  c2, c1, c0 = np.polyfit(x, y, 2)
  best = int(np.argmin(y))
  reason = ''
  if c2 <= 0:
    reason = 'the parabola opens downwards'
  elif x[best] in (x.min(), x.max()):
    reason = 'best run is the ' + ('smallest' if x[best] == x.min() else 'largest') + ' model'
  x_opt = -c1 / (2 * c2) if c2 > 0 else x[best]
  if not reason and not x.min() < x_opt < x.max():
    reason = 'vertex outside the grid'
  # D at the optimum: D = C / FLOPs-per-token(N) is smooth in N; a line in log-log suffices.
  slope, intercept = np.polyfit(x, ln_d, 1)
  return IsoFlopFit(budget=float(budget), coeffs=(float(c2), float(c1), float(c0)),
                    n_opt=float(np.exp(x_opt)), d_opt=float(np.exp(intercept + slope * x_opt)),
                    loss_opt=float(c0 + c1 * x_opt + c2 * x_opt ** 2), edge=bool(reason),
                    reason=reason, num_runs=len(x))


BUDGET_TOLERANCE = 0.1  # runs whose budgets differ by at most 10% are one budget


def group_budgets(c, tolerance: float = BUDGET_TOLERANCE) -> np.ndarray:
  """Budget labels (FLOPs, float64, the shape of `c`): runs of one IsoFLOP budget share one.

  Budgets read off a paper's figure (Epoch AI's extraction of Chinchilla's runs) or
  computed from each run's own FLOPs are approximate: nearly every run has its own
  value. Sorted by C, runs are grouped greedily from the smallest: a run joins the current
  group while its C is at most (1 + tolerance) times the group's first C, so a group spans
  at most a factor 1 + tolerance (ln(1.1) = 0.095 in log space for the default 0.1) and a
  dense range of budgets never chains into one group. The label is the group's geometric
  mean (its value when all are equal). tolerance 0 groups equal values only; budgets of
  a designed sweep are factors of 2 or more apart, so any tolerance below ~0.4 keeps them.
  Raises ValueError for a negative tolerance or a budget that is not a positive number.
  """
  c = np.asarray(c, float)
  if tolerance < 0 or not math.isfinite(tolerance):
    raise ValueError(f'budget tolerance {tolerance}: expected a number >= 0')
  if not np.all(np.isfinite(c) & (c > 0)):
    raise ValueError('budgets must be positive, finite FLOP counts')
  order = np.argsort(c, kind='stable')
  labels = np.empty_like(c)
  limit = math.log1p(tolerance) * (1 + 1e-12)  # (equal values stay together at tolerance 0)
  start = 0
  ln_c = np.log(c[order])
  for i in range(1, len(order) + 1):
    if i == len(order) or ln_c[i] - ln_c[start] > limit:
      members = order[start:i]
      group = c[members]
      labels[members] = group[0] if np.all(group == group[0]) else np.exp(ln_c[start:i].mean())
      start = i
  return labels


def power_law(c, y, level: float = 0.95) -> dict:
  """y = G · C^slope by least squares on logs; slope standard error and t-interval."""
  lc, ly = np.log(np.asarray(c, float)), np.log(np.asarray(y, float))
  m = len(lc)
  if m < 2:
    return dict(slope=float('nan'), coef=float('nan'), se=float('nan'),
                ci=(float('nan'), float('nan')), num=m)
  slope, intercept = np.polyfit(lc, ly, 1)
  se, ci = float('nan'), (float('nan'), float('nan'))
  if m > 2:
    resid = ly - (intercept + slope * lc)
    se = float(np.sqrt(resid @ resid / (m - 2) / np.sum((lc - lc.mean()) ** 2)))
    t = scipy.stats.t.ppf(0.5 + level / 2, m - 2)
    ci = (float(slope - t * se), float(slope + t * se))
  return dict(slope=float(slope), coef=float(np.exp(intercept)), se=se, ci=ci, num=m)


def approach2(n, d, c, loss, tolerance: float = BUDGET_TOLERANCE) -> dict:
  """Per-budget parabolas, then N_opt(C) and D_opt(C) power laws over the bracketed budgets.

  Runs are grouped into budgets by `group_budgets(c, tolerance)`. Returns
  dict(fits=[IsoFlopFit] (one per budget, ascending), a=power_law for N_opt, b=power_law
  for D_opt, budgets_used=[C], labels=the budget label of each run).
  """
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  labels = group_budgets(c, tolerance)
  fits = [fit_isoflop(b, n[labels == b], d[labels == b], loss[labels == b])
          for b in np.unique(labels)]
  good = [f for f in fits if not f.edge]
  cs = [f.budget for f in good]
  return dict(fits=fits, budgets_used=cs, a=power_law(cs, [f.n_opt for f in good]),
              b=power_law(cs, [f.d_opt for f in good]), labels=labels)


def approach2_bootstrap(n, d, c, loss, num: int, seed: int = 0,
                        tolerance: float = BUDGET_TOLERANCE) -> np.ndarray:
  """Exponents (a, b) refitted on runs resampled within each budget (grouped once, by
  `group_budgets(c, tolerance)`); rows with fewer than two bracketed budgets are NaN."""
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  labels = group_budgets(c, tolerance)
  rng = np.random.default_rng(seed)
  groups = [np.flatnonzero(labels == b) for b in np.unique(labels)]
  out = np.full((num, 2), np.nan)
  for i in range(num):
    idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
    r = approach2(n[idx], d[idx], labels[idx], loss[idx], tolerance=0.0)
    if r['a']['num'] >= 2:
      out[i] = r['a']['slope'], r['b']['slope']
  return out


# --------------------------------------------------------------------------------------
# Approach 3: parametric L(N, D).


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  @property
  def a(self) -> float:
    """N_opt ∝ C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """D_opt ∝ C^b."""
    return self.alpha / (self.alpha + self.beta)

  def loss(self, n, d):
    return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(
        d, float) ** self.beta

  def theta(self) -> np.ndarray:
    return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

  @classmethod
  def from_theta(cls, theta) -> 'Law':
    a, b, e, alpha, beta = (float(v) for v in theta)
    with np.errstate(over='ignore'):
      return cls(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha,
                 beta=beta)

  def compute_optimal(self, c, flops_per_param_token: float = 6.0) -> dict:
    """N, D and loss minimising L subject to C = k·N·D (k = `flops_per_param_token`)."""
    c = np.asarray(c, float) / flops_per_param_token
    with np.errstate(all='ignore'):  # a degenerate bootstrap law gives inf/NaN, dropped later
      g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
      n, d = g * c ** self.a, c ** self.b / g
      return dict(n=n, d=d, loss=self.loss(n, d), tokens_per_param=d / n)


def init_grid(name: str = 'hoffmann') -> np.ndarray:
  """Starting points θ = (ln A, ln B, ln E, α, β); 'hoffmann' is the paper's 4500-point grid."""
  if name == 'hoffmann':
    ab, e, exps = np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5)
  elif name == 'coarse':
    ab, e, exps = np.array([0.0, 5, 10]), np.array([-1.0, 0, 1]), np.array([0.0, 0.5, 1])
  else:
    raise ValueError(f'init grid {name!r}: expected hoffmann or coarse')
  return np.array([(a, b, e_, al, be) for a, b, e_, al, be in
                   itertools.product(ab, ab, e, exps, exps)])


def huber_objective(theta, ln_n, ln_d, ln_loss, delta: float):
  """Σ Huber_δ(LSE − ln L) / δ and its gradient (divided by δ so L-BFGS's tolerances,
  which are absolute below |f| = 1, do not stop it early: Besiroglu et al. 2024).
  Written out by hand: it runs ~10⁵–10⁶ times per fit, and scipy's logsumexp is slow."""
  a, b, e, alpha, beta = theta
  t1, t2 = a - alpha * ln_n, b - beta * ln_d
  m = np.maximum(np.maximum(t1, t2), e)
  e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
  s = e1 + e2 + e3
  r = m + np.log(s) - ln_loss
  absr = np.abs(r)
  f = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum() / delta
  psi = np.clip(r, -delta, delta) / (delta * s)  # times the softmax weight e_i / s below
  g1, g2 = psi * e1, psi * e2
  g = np.array([g1.sum(), g2.sum(), (psi * e3).sum(), -(g1 @ ln_n), -(g2 @ ln_d)])
  return f, g


# α, β ≥ 0: on runs that do not pin the law down (one budget, a few sizes) the unbounded
# fit wanders to negative exponents, a loss that grows with N or D.
_BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2


@dataclasses.dataclass(frozen=True)
class LawFit:
  law: Law
  objective: float
  solutions: np.ndarray  # distinct local optima θ, best first (warm starts for bootstrap)


def fit_law(n, d, loss, delta: float = 1e-3, starts: Optional[np.ndarray] = None,
            max_starts: Optional[int] = 100, keep: int = 4) -> LawFit:
  """Approach 3 by L-BFGS from the starts; keeps the `keep` best distinct solutions.

  With `max_starts`, L-BFGS runs only from the starts with the lowest objective (all are
  evaluated): on a busy CPU one run costs ~50 ms, so Hoffmann's 4500 would take minutes
  per bootstrap resample. On the tests' synthetic laws the best 100 of the 4500 reached the
  same optimum as all 4500.
  """
  ln_n, ln_d, ln_l = (np.log(np.asarray(v, float)) for v in (n, d, loss))
  starts = init_grid('hoffmann') if starts is None else np.atleast_2d(starts)
  if max_starts and len(starts) > max_starts:
    values = np.array([huber_objective(x, ln_n, ln_d, ln_l, delta)[0] for x in starts])
    values[~np.isfinite(values)] = np.inf
    starts = starts[np.argsort(values, kind='stable')[:max_starts]]
  results = []
  for x0 in starts:
    res = scipy.optimize.minimize(huber_objective, x0, args=(ln_n, ln_d, ln_l, delta),
                                  jac=True, method='L-BFGS-B', bounds=_BOUNDS,
                                  options=dict(maxiter=2000, ftol=1e-13, gtol=1e-9))
    if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
      results.append((float(res.fun), res.x))
  if not results:
    raise ValueError('approach 3: no start converged to a finite objective')
  results.sort(key=lambda r: r[0])
  distinct = []
  for f, x in results:
    if all(np.max(np.abs(x - y)) > 1e-3 for y in distinct):
      distinct.append(x)
    if len(distinct) == keep:
      break
  return LawFit(law=Law.from_theta(results[0][1]), objective=results[0][0],
                solutions=np.array(distinct))


def bootstrap_laws(n, d, loss, num: int, starts: np.ndarray, delta: float = 1e-3,
                   seed: int = 0) -> list:
  """Approach 3 refitted on `num` resamples of the runs (with replacement), warm-started."""
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  rng = np.random.default_rng(seed)
  laws = []
  for _ in range(num):
    idx = rng.choice(len(n), len(n))
    laws.append(fit_law(n[idx], d[idx], loss[idx], delta, starts, max_starts=None,
                        keep=1).law)
  return laws


def interval(samples, level: float = 0.95) -> dict:
  """Standard error and percentile interval of bootstrap samples (NaNs dropped)."""
  s = np.asarray(samples, float)
  s = s[np.isfinite(s)]
  if len(s) < 2:
    return dict(se=float('nan'), ci=(float('nan'), float('nan')), num=len(s))
  lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
  with np.errstate(over='ignore', invalid='ignore'):  # a degenerate law's A may be ~1e300
    se = float(np.std(s, ddof=1))
  return dict(se=se, ci=(float(lo), float(hi)), num=len(s))


def law_intervals(laws: Sequence[Law], budgets=(), flops_per_param_token: float = 6.0,
                  level: float = 0.95) -> dict:
  """Bootstrap intervals for E, A, B, α, β, a, b and, per budget, compute-optimal n, d, loss."""
  out = {k: interval([getattr(l, k) for l in laws], level)
         for k in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')}
  for c in budgets:
    opts = [l.compute_optimal(c, flops_per_param_token) for l in laws]
    for k in ('n', 'd', 'loss', 'tokens_per_param'):
      out[(c, k)] = interval([float(o[k]) for o in opts], level)
  return out
