"""Gao et al. 2022's over-optimisation forms: fits recover known coefficients, peaks sit
where the forms are largest, bootstrap intervals cover the truth, measured peaks."""
import numpy as np
import pytest

from research import overoptimization as overopt


def curves(form, alpha, beta, seeds=4, noise=0.01, d_max=3.0, points=9):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(seeds):
    d = np.sqrt(np.linspace(0.0, d_max ** 2, points))
    out.append((d, overopt.predict(form, alpha, beta, d) + rng.normal(0, noise, d.shape)))
  return out


@pytest.mark.parametrize('form,alpha,beta', [('bon', 0.4, 0.12), ('rl', 0.3, 0.25),
                                             ('rl', 0.1, -0.05)])
def test_fit_recovers_known_coefficients_exactly_without_noise(form, alpha, beta):
  d = np.array([0.0, 0.3, 0.7, 1.0, 1.5, 2.2])
  f = overopt.fit(form, d, overopt.predict(form, alpha, beta, d))
  assert f['alpha'] == pytest.approx(alpha, abs=1e-9)
  assert f['beta'] == pytest.approx(beta, abs=1e-9)
  assert f['rmse'] < 1e-9 and f['n'] == 6


def test_forms_against_hand_values():
  # best-of-n: 2·(0.5 − 0.1·2) = 0.6; RL at d = e: e·(0.5 − 0.1·1) = 0.4e; RL at d = 0 is 0.
  assert overopt.predict('bon', 0.5, 0.1, [2.0])[0] == pytest.approx(0.6)
  assert overopt.predict('rl', 0.5, 0.1, [np.e])[0] == pytest.approx(0.4 * np.e)
  assert overopt.predict('rl', 0.5, 0.1, [0.0])[0] == 0.0
  with pytest.raises(ValueError, match='form'):
    overopt.predict('ppo', 0.5, 0.1, [1.0])


@pytest.mark.parametrize('form,alpha,beta', [('bon', 0.4, 0.12), ('rl', 0.3, 0.25)])
def test_peak_is_the_maximum_of_the_form(form, alpha, beta):
  d_peak, gain_peak = overopt.peak(form, alpha, beta)
  grid = np.linspace(1e-6, 10 * d_peak, 200_001)
  values = overopt.predict(form, alpha, beta, grid)
  assert grid[np.argmax(values)] == pytest.approx(d_peak, rel=1e-3)
  assert values.max() == pytest.approx(gain_peak, rel=1e-6)


def test_no_peak_when_beta_is_not_positive():
  assert overopt.peak('bon', 0.3, 0.0) == (float('inf'), float('inf'))
  assert overopt.peak('rl', 0.3, -0.1)[0] == float('inf')


@pytest.mark.parametrize('form,alpha,beta', [('bon', 0.4, 0.12), ('rl', 0.3, 0.25)])
def test_bootstrap_over_seeds_covers_the_true_coefficients(form, alpha, beta):
  f = overopt.bootstrap_fit(form, curves(form, alpha, beta), num_samples=300, seed=1)
  assert f['unit'] == 'seeds' and f['curves'] == 4 and f['samples'] == 300
  assert f['alpha_interval'][0] <= alpha <= f['alpha_interval'][1]
  assert f['beta_interval'][0] <= beta <= f['beta_interval'][1]
  d_peak, _ = overopt.peak(form, alpha, beta)
  assert f['d_peak_interval'][0] <= d_peak <= f['d_peak_interval'][1]
  assert f['alpha'] == pytest.approx(alpha, abs=0.02) and f['beta'] == pytest.approx(beta,
                                                                                    abs=0.02)
  # Intervals shrink with less noise and widen with more.
  tight = overopt.bootstrap_fit(form, curves(form, alpha, beta, noise=0.001), num_samples=300)
  wide = overopt.bootstrap_fit(form, curves(form, alpha, beta, noise=0.05), num_samples=300)
  width = lambda x: x['beta_interval'][1] - x['beta_interval'][0]
  assert width(tight) < width(f) < width(wide)


def test_bootstrap_resamples_points_with_few_seeds():
  f = overopt.bootstrap_fit('bon', curves('bon', 0.4, 0.12, seeds=2), num_samples=200)
  assert f['unit'] == 'points' and f['curves'] == 2
  assert f['beta_interval'][0] <= 0.12 <= f['beta_interval'][1]
  assert f['beta_interval'][1] > f['beta_interval'][0]


def test_fit_refuses_too_few_points():
  with pytest.raises(ValueError, match='2'):
    overopt.fit('rl', [0.0, 1.0], [0.0, 0.2])
  with pytest.raises(ValueError, match='shape'):
    overopt.fit('rl', [0.5, 1.0, 2.0], [0.0, 0.2])


def test_peaks_then_falls_on_measured_curves():
  d = [0.0, 0.5, 1.0, 1.5]
  assert overopt.peaks_then_falls(d, [0.0, 0.2, 0.3, 0.1]) is True
  assert overopt.peaks_then_falls(d, [0.0, 0.2, 0.3, 0.4]) is False  # still rising
  assert overopt.peaks_then_falls(d, [0.5, 0.2, 0.1, 0.0]) is False  # highest at the start
  assert overopt.peaks_then_falls(d, [0.0, 0.3, 0.29, 0.295], tolerance=0.01) is False
  assert overopt.peaks_then_falls([1.0, 0.0, 0.5, 1.5], [0.3, 0.0, 0.2, 0.1]) is True  # sorts by d
  assert overopt.peaks_then_falls(d[:2], [0.0, 0.1]) is None
