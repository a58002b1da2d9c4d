"""Scaling-law fits on synthetic runs from a known L(N, D), and the sweep's CSV and restart."""
import csv
import json
import re

import numpy as np
import pytest
import scipy.stats

from configs import scaling as scaling_config
from experiments import scaling
from experiments import scaling_fit as scaling_fit_exp
from research import scaling_fit as sf
from tests.test_pretrain import write_corpus

# Hoffmann et al. 2022's approach-3 law: a = β/(α+β) ≈ 0.452, b ≈ 0.548. The exponents
# differ by much more than the tests' tolerance (0.03), so swapping a and b is caught
# (Besiroglu et al.'s refit, α ≈ β, gives a ≈ 0.513 and b ≈ 0.487: too close).
TRUE = sf.Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def isoflop_runs(law, budgets, sizes=7, span=1.5, noise=0.005, seed=0, k=6.0):
  """Per budget, sizes spread ±span in ln N around the optimum (randomly offset, as a fixed
  ladder would be), D = C / (k N), losses with multiplicative noise."""
  rng = np.random.default_rng(seed)
  n, d, c = [], [], []
  for budget in budgets:
    centre = np.log(law.compute_optimal(budget, k)['n']) + rng.uniform(-0.3, 0.3)
    for u in np.linspace(-span, span, sizes):
      n.append(np.exp(centre + u + rng.uniform(-0.1, 0.1)))
      d.append(budget / (k * n[-1]))
      c.append(budget)
  n, d, c = map(np.array, (n, d, c))
  return n, d, c, law.loss(n, d) * np.exp(rng.normal(0, noise, len(n)))


@pytest.fixture(scope='module')
def synthetic():
  return isoflop_runs(TRUE, np.logspace(18, 22, 5))


@pytest.fixture(scope='module')
def law_fit(synthetic):
  n, d, _, loss = synthetic
  return sf.fit_law(n, d, loss, starts=sf.init_grid('coarse'), max_starts=40)


@pytest.mark.slow
def test_approach3_recovers_the_law(law_fit):
  law = law_fit.law
  assert abs(law.alpha - TRUE.alpha) < 0.03, law
  assert abs(law.beta - TRUE.beta) < 0.03, law
  assert abs(law.E - TRUE.E) < 0.05, law
  assert abs(law.a - TRUE.a) < 0.03, law


@pytest.mark.slow
def test_screened_grid_finds_the_same_optimum_as_every_start(synthetic, law_fit):
  n, d, _, loss = synthetic
  starts = sf.init_grid('coarse')[::4]  # 61 spread-out starts keep this test short
  full = sf.fit_law(n, d, loss, starts=starts, max_starts=None)
  screened = sf.fit_law(n, d, loss, starts=starts, max_starts=8)
  assert screened.objective == pytest.approx(full.objective, rel=1e-6)
  assert full.objective == pytest.approx(law_fit.objective, rel=1e-6)


def test_huber_gradient_matches_finite_differences(synthetic):
  n, d, _, loss = synthetic
  args = (np.log(n), np.log(d), np.log(loss), 1e-3)
  theta = TRUE.theta() + np.array([0.1, -0.1, 0.02, 0.01, -0.01])
  _, g = sf.huber_objective(theta, *args)
  eye = np.eye(5) * 1e-6
  num = [(sf.huber_objective(theta + e, *args)[0] - sf.huber_objective(theta - e, *args)[0]) / 2e-6
         for e in eye]
  np.testing.assert_allclose(g, num, rtol=1e-4)


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth(synthetic, law_fit):
  n, d, _, loss = synthetic
  laws = sf.bootstrap_laws(n, d, loss, 30, law_fit.solutions, seed=1)
  iv = sf.law_intervals(laws, budgets=[1e22])
  for key in ('alpha', 'beta', 'a'):
    lo, hi = iv[key]['ci']
    assert lo - 0.02 < getattr(TRUE, key) < hi + 0.02, (key, iv[key])
    assert 0 < iv[key]['se'] < 0.05
  lo, hi = iv[(1e22, 'n')]['ci']
  assert lo < law_fit.law.compute_optimal(1e22)['n'] < hi
  # Resampled fits differ (the intervals have width) and bracket the full-data fit.
  for key in ('alpha', 'beta', 'a', 'b', 'E'):
    lo, hi = iv[key]['ci']
    assert iv[key]['num'] == 30 and hi - lo > 1e-4, (key, iv[key])
    assert lo < getattr(law_fit.law, key) < hi, (key, iv[key])


def test_compute_optimal_exponents_are_beta_and_alpha_over_their_sum():
  assert TRUE.a == pytest.approx(0.28 / 0.62) and TRUE.b == pytest.approx(0.34 / 0.62)
  assert TRUE.a + TRUE.b == pytest.approx(1.0) and TRUE.b - TRUE.a > 0.06
  # N_opt and D_opt grow as C^a and C^b: a 10x budget multiplies them by 10^a and 10^b.
  low, high = TRUE.compute_optimal(1e20), TRUE.compute_optimal(1e21)
  assert np.log10(high['n'] / low['n']) == pytest.approx(TRUE.a, rel=1e-9)
  assert np.log10(high['d'] / low['d']) == pytest.approx(TRUE.b, rel=1e-9)
  # The minimum of L(N, C / 6N) over a fine grid of N is at compute_optimal's N.
  n = np.exp(np.linspace(np.log(low['n']) - 2, np.log(low['n']) + 2, 4001))
  best = n[np.argmin(TRUE.loss(n, 1e20 / (6 * n)))]
  assert best == pytest.approx(low['n'], rel=2e-3)


def test_compute_optimal_is_the_minimum_on_the_budget():
  c, k = 1e21, 6.0
  opt = TRUE.compute_optimal(c, k)
  assert opt['n'] * opt['d'] * k == pytest.approx(c)
  for factor in (0.8, 1.25):
    n = opt['n'] * factor
    assert TRUE.loss(n, c / (k * n)) > opt['loss']
  assert opt['tokens_per_param'] == pytest.approx(opt['d'] / opt['n'])


def test_approach2_recovers_the_exponent(synthetic):
  n, d, c, loss = synthetic
  r = sf.approach2(n, d, c, loss)
  assert not any(f.edge for f in r['fits'])
  assert abs(r['a']['slope'] - TRUE.a) < 0.03, r['a']
  assert abs(r['b']['slope'] - TRUE.b) < 0.03, r['b']
  assert r['a']['ci'][0] < r['a']['slope'] < r['a']['ci'][1]


def test_approach2_bootstrap_intervals_have_width_and_contain_the_estimate(synthetic):
  n, d, c, loss = synthetic
  point = sf.approach2(n, d, c, loss)
  samples = sf.approach2_bootstrap(n, d, c, loss, 40, seed=0)
  assert samples.shape == (40, 2) and np.isfinite(samples).mean() > 0.9
  for col, key in enumerate(('a', 'b')):
    iv = sf.interval(samples[:, col])
    lo, hi = iv['ci']
    assert hi - lo > 1e-3 and iv['se'] > 1e-4, (key, iv)  # resampling moves the fit
    assert lo < point[key]['slope'] < hi, (key, iv, point[key]['slope'])
    assert abs(np.nanmedian(samples[:, col]) - getattr(TRUE, key)) < 0.03, key
  # Another seed draws other resamples.
  assert not np.allclose(samples, sf.approach2_bootstrap(n, d, c, loss, 40, seed=1),
                         equal_nan=True)


def test_power_law_and_interval_against_scipy_and_hand_values():
  rng = np.random.default_rng(0)
  c = np.logspace(18, 22, 6)
  y = 3e-2 * c ** 0.45 * np.exp(rng.normal(0, 0.05, 6))
  fit = sf.power_law(c, y)
  ref = scipy.stats.linregress(np.log(c), np.log(y))
  assert fit['slope'] == pytest.approx(ref.slope, rel=1e-9)
  assert fit['coef'] == pytest.approx(np.exp(ref.intercept), rel=1e-9)
  assert fit['se'] == pytest.approx(ref.stderr, rel=1e-9)
  half = scipy.stats.t.ppf(0.975, 4) * ref.stderr
  assert fit['ci'] == pytest.approx((ref.slope - half, ref.slope + half), rel=1e-9)
  # Percentile interval: 2.5% and 97.5% of 0..1000 are 25 and 975; NaNs dropped.
  iv = sf.interval(np.append(np.arange(1001.0), np.nan))
  assert iv['num'] == 1001 and iv['ci'] == pytest.approx((25.0, 975.0))
  assert iv['se'] == pytest.approx(np.std(np.arange(1001.0), ddof=1))
  assert sf.interval(np.arange(1001.0), level=0.5)['ci'] == pytest.approx((250.0, 750.0))


def test_edge_optima_are_flagged_and_left_out():
  budgets = np.logspace(18, 21, 4)
  n, d, c, loss = isoflop_runs(TRUE, budgets, noise=0.0)
  # The last budget's grid only holds models 3-20x smaller than its optimum.
  last = c == budgets[-1]
  n[last] = n[last] / np.exp(1.5 + 1.2)
  d[last] = budgets[-1] / (6 * n[last])
  loss[last] = TRUE.loss(n[last], d[last])
  r = sf.approach2(n, d, c, loss)
  flags = {f.budget: (f.edge, f.reason) for f in r['fits']}
  assert flags[budgets[-1]][0] and 'largest' in flags[budgets[-1]][1], flags
  assert not any(flags[b][0] for b in budgets[:-1]), flags
  assert r['budgets_used'] == pytest.approx(budgets[:-1])
  assert abs(r['a']['slope'] - TRUE.a) < 0.03
  few = sf.fit_isoflop(1e20, [1e8, 2e8], [1e9, 5e8], [2.5, 2.4])
  assert few.edge and '3' in few.reason


@pytest.mark.slow
def test_fit_cli_writes_report_and_figures(synthetic, tmp_path):
  n, d, c, loss = synthetic
  path = tmp_path / 'runs.csv'
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['N', 'D', 'C', 'loss', 'convention'])
    w.writerows(zip(n, d, c, loss, ['6N'] * len(n)))
  logs = []
  result = scaling_fit_exp.analyse(scaling_fit_exp.read_runs(path), tmp_path, bootstrap=5,
                                   grid='coarse', max_starts=20, log=logs.append)
  assert all('[6N FLOPs' in line for line in logs[:-1])
  assert result['flops_per_param_token'] == pytest.approx(6.0)
  assert abs(result['approach2']['a']['slope'] - TRUE.a) < 0.03
  for name in ('isoflop.png', 'optimal.png', 'contours.png', 'frontier.png', 'report.md'):
    assert (tmp_path / name).stat().st_size > 0, name
  assert 'tokens per parameter' in (tmp_path / 'report.md').read_text()
  json.loads((tmp_path / 'fit.json').read_text())
  with pytest.raises(scaling_fit_exp.FitError, match='N, D, loss'):
    bad = tmp_path / 'bad.csv'
    bad.write_text('n,d\n1,2\n')
    scaling_fit_exp.read_runs(bad)


def test_default_plan_brackets_each_budget_with_five_sizes():
  config = scaling_config.get_config('cpu')
  runs = scaling.plan(config)
  budgets = sorted(set(r.budget for r in runs))
  assert len(budgets) >= 4 and len(runs) == 5 * len(budgets)
  tokens_per_step = config.base.data.batch_size * config.base.data.seq_len
  for b in budgets:
    mine = [r for r in runs if r.budget == b]
    assert len({r.n for r in mine}) == 5
    ratios = [r.tokens / r.n for r in mine]
    assert min(ratios) < config.sweep.tokens_per_param < max(ratios)
    for r in mine:  # D = C / FLOPs-per-token, to a whole step
      assert abs(r.tokens * r.flops_per_token - b) <= tokens_per_step * r.flops_per_token / 2


@pytest.mark.slow
def test_sweep_writes_csv_and_skips_finished_runs(tmp_path, monkeypatch):
  config = scaling_config.get_config('test')
  config.base.data.corpus = str(write_corpus(tmp_path / 'corpus', docs=30))
  study = tmp_path / 'study'
  rows = scaling.sweep(config, study)
  runs = scaling.plan(config)
  assert [r['run_id'] for r in rows] == [r.run_id for r in runs]
  for row, run in zip(rows, runs):
    assert row['convention'] == 'chinchilla' and int(row['N']) == run.n
    assert int(row['D']) == run.tokens and float(row['C']) == run.budget
    assert 0 < float(row['loss']) < 10 and float(row['wall_seconds']) > 0
    saved = json.loads((study / 'runs' / run.run_id / 'config.json').read_text())
    assert saved['optimizer']['total_steps'] == saved['train']['steps'] == run.steps
    assert saved['tokenizer']['path'] == str(study / 'tokenizer.model')

  def no_training(*args, **kwargs):
    raise AssertionError('a finished run was trained again')
  monkeypatch.setattr(scaling.pretrain, 'train', no_training)
  again = scaling.sweep(config, study)
  assert again == rows
  assert len((study / 'runs.csv').read_text().splitlines()) == 1 + len(runs)


# Approximate budgets (issue 19): C read off a figure, or each run's own FLOPs, differ
# slightly from run to run; a budget is the runs within a tolerance, not one exact value.
NOMINAL = np.logspace(18, 22, 9)  # a factor 3.16 apart


def jittered_runs(jitter=0.04, seed=1, **kw):
  """isoflop_runs on NOMINAL, then each run's C (and so its D and loss) moved by a
  factor in [1 - jitter, 1 + jitter]: the true grouping is the nominal budget."""
  n, _, c, _ = isoflop_runs(TRUE, NOMINAL, seed=seed, **kw)
  rng = np.random.default_rng(seed + 100)
  c_run = c * rng.uniform(1 - jitter, 1 + jitter, len(c))
  d = c_run / (6 * n)
  loss = TRUE.loss(n, d) * np.exp(rng.normal(0, 0.005, len(n)))
  return n, d, c_run, loss, c


def test_group_budgets_recovers_jittered_budgets_and_never_chains():
  _, _, c_run, _, nominal = jittered_runs()
  assert len(np.unique(c_run)) == len(c_run)  # every run its own "budget"
  labels = sf.group_budgets(c_run)
  assert len(np.unique(labels)) == len(NOMINAL)
  for budget in NOMINAL:  # the groups are exactly the nominal budgets' runs
    mine = labels[nominal == budget]
    assert len(np.unique(mine)) == 1 and mine[0] == pytest.approx(budget, rel=0.04)
  # Equal budgets keep their exact value; tolerance 0 groups equal values only.
  assert list(sf.group_budgets([1e20, 1e20, 3e20])) == [1e20, 1e20, 3e20]
  assert len(np.unique(sf.group_budgets(c_run, 0.0))) == len(c_run)
  # A dense range (a factor 1.05 apart) is cut into groups spanning at most 1.1.
  dense = np.logspace(18, 20, 95)
  labels = sf.group_budgets(dense)
  for label in np.unique(labels):
    members = dense[labels == label]
    assert members.max() / members.min() <= 1.1 + 1e-9
  assert 40 <= len(np.unique(labels)) <= 50
  with pytest.raises(ValueError, match='tolerance'):
    sf.group_budgets(dense, -0.1)


def test_approach2_on_jittered_budgets_recovers_the_optimum():
  n, d, c_run, loss, _ = jittered_runs()
  r = sf.approach2(n, d, c_run, loss)
  assert len(r['fits']) == len(NOMINAL) and r['a']['num'] >= len(NOMINAL) - 1
  assert abs(r['a']['slope'] - TRUE.a) < 0.03, r['a']
  assert abs(r['b']['slope'] - TRUE.b) < 0.03, r['b']
  for f in r['fits']:
    if not f.edge:  # each vertex near the true compute-optimal N of its budget (the loss
      # noise moves vertices by up to 18% with exact budgets too, seeds 1-3)
      assert f.n_opt == pytest.approx(TRUE.compute_optimal(f.budget)['n'], rel=0.25)
  exact = sf.approach2(n, d, c_run, loss, tolerance=0.0)  # the failure the issue saw
  assert exact['a']['num'] == 0 and all(f.num_runs == 1 for f in exact['fits'])
  boot = sf.approach2_bootstrap(n, d, c_run, loss, 20, seed=0)
  assert np.isfinite(boot).all() and abs(np.median(boot[:, 0]) - TRUE.a) < 0.03


def write_table(path, rows, header=('run_id', 'N', 'D', 'C', 'loss', 'convention')):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


@pytest.fixture(scope='module')
def dirty_table(tmp_path_factory):
  """Jittered runs with one more size (10) per budget, and five bad rows among them."""
  n, d, c_run, loss, _ = jittered_runs(sizes=10)
  rows = [[f'r{i}', f'{a:.6g}', f'{b:.6g}', f'{cc:.6g}', f'{x:.6g}', '6N']
          for i, (a, b, cc, x) in enumerate(zip(n, d, c_run, loss))]
  bad = {4: ('N', '-1000000'), 11: ('loss', 'nan'), 30: ('D', 'abc'), 50: ('C', '0'),
         77: ('loss', '')}
  column = {'N': 1, 'D': 2, 'C': 3, 'loss': 4}
  for i, (key, value) in bad.items():
    rows[i][column[key]] = value
  path = write_table(tmp_path_factory.mktemp('dirty') / 'runs.csv', rows)
  return path, rows, bad


def test_dropped_rows_are_counted_and_named_and_the_report_lists_only_used_rows(dirty_table,
                                                                              tmp_path):
  path, rows, bad = dirty_table
  logs = []
  result = scaling_fit_exp.analyse(scaling_fit_exp.read_runs(path), tmp_path, bootstrap=0,
                                   grid='coarse', max_starts=10, log=logs.append)
  reasons = {4: "N='-1000000' is not positive", 11: "loss='nan' is not finite",
             30: "D='abc' is not a number", 50: "C='0' is not positive",
             77: "loss='' is missing"}
  dropped = {d['row']: d['reason'] for d in result['dropped_rows']}
  assert dropped == {f'row {i + 1} (line {i + 2})': why for i, why in reasons.items()}
  assert result['num_runs'] == len(rows) - 5 and len(result['used_rows']) == len(rows) - 5
  assert logs[0].startswith(f'runs [6N FLOPs]: {len(rows)} read, {len(rows) - 5} used, 5 dropped: '
                            "row 5 (line 6): N='-1000000' is not positive; "), logs[0]
  assert '(and 2 more: all in report.md)' in logs[0]
  report = (tmp_path / 'report.md').read_text()
  used_table = report.split('## Runs used')[1].split('## Dropped rows')[0]
  listed = [line.split('|')[2].strip() for line in used_table.splitlines()
            if re.match(r'\| row \d', line)]
  assert listed == [r[0] for i, r in enumerate(rows) if i not in bad]  # exactly the runs used
  dropped_table = report.split('## Dropped rows')[1]
  for i, why in reasons.items():
    assert f'| row {i + 1} (line {i + 2}) | {why} |' in dropped_table
  assert abs(result['approach2']['a']['slope'] - TRUE.a) < 0.03


def test_fit_cli_output_is_short_with_many_budgets(dirty_table, tmp_path):
  """The issue's failure: hundreds of one-run budgets. With distinct C everywhere
  (tolerance 0) the printed output stays a few summary lines; the default groups them."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  path, rows, _ = dirty_table
  for tolerance, budgets in (('0', len(rows) - 5), ('0.1', len(NOMINAL))):
    out = subprocess.run(
        [sys.executable, '-m', 'experiments.scaling_fit', str(path), f'--out={tmp_path}',
         '--bootstrap=0', '--grid=coarse', '--max_starts=10',
         f'--budget_tolerance={tolerance}'], cwd=scaling_fit_exp.pathlib.Path(
             __file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) <= 12, lines
    fit = json.loads((tmp_path / 'fit.json').read_text())
    assert len(fit['approach2']['budgets']) == budgets
    assert any(f'approach 2 [6N FLOPs]: {budgets} budgets' in l for l in lines), lines
    if tolerance == '0':
      assert f'0 bracketed, left out: {budgets} under 3 sizes' in out.stdout, lines
    else:
      assert f'{len(NOMINAL)} budgets (runs within a factor 1.1 grouped)' in out.stdout, lines
