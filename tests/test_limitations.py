"""Limitation metrics on constructed cases with known answers (pure numpy, no model)."""
import random

import numpy as np
import pytest

from research import limitations as lim


def test_world_is_deterministic_in_its_seed():
  a, b, c = lim.make_world(50, 3), lim.make_world(50, 3), lim.make_world(50, 4)
  assert a == b and a != c
  assert len({p.name for p in a}) == 50
  assert lim.split_people(a, (0.5, 0.5), 1) == lim.split_people(b, (0.5, 0.5), 1)
  known, unknown = lim.split_people(a, (0.5, 0.5), 1)
  assert not {p.name for p in known} & {p.name for p in unknown}
  p = a[0]
  assert all(p.name in t and str(p.birth_year) in t and p.city in t and p.profession in t
             for t in lim.biographies(p))
  with pytest.raises(ValueError, match='num_people'):
    lim.make_world(10**6, 0)


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
  # Within each confidence level, exactly that share of answers is right.
  conf, correct = [], []
  for c, n in ((0.25, 8), (0.5, 10), (0.75, 12), (1.0, 5)):
    k = int(round(c * n))
    conf += [c] * n
    correct += [1] * k + [0] * (n - k)
  assert lim.expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
  # Always 90% sure, right half the time: ECE = 0.4.
  assert lim.expected_calibration_error([0.9] * 10, [1, 0] * 5) == pytest.approx(0.4)
  with pytest.raises(ValueError, match='shape'):
    lim.expected_calibration_error([0.5], [1, 0])


def test_hallucination_metrics_on_known_answers():
  idk = 2
  probs = np.array([[0.9, 0.05, 0.05],   # known, right, confident
                    [0.2, 0.7, 0.1],     # known, wrong
                    [0.1, 0.1, 0.8],     # unknown, abstains
                    [0.8, 0.1, 0.1],     # unknown, confident made-up
                    [0.45, 0.3, 0.25]])  # unknown, unsure made-up
  m = lim.hallucination_metrics(probs, gold_N=[0, 0, 0, 0, 0],
                                known_N=[True, True, False, False, False], idk_index=idk)
  assert (m['known'], m['unknown']) == (2, 3)
  assert m['known_accuracy'] == 0.5 and m['known_idk'] == 0.0
  assert m['unknown_idk'] == pytest.approx(1 / 3)
  assert m['unknown_made_up'] == pytest.approx(2 / 3)
  assert m['unknown_confident_made_up'] == pytest.approx(1 / 3)
  scores = np.log(probs)
  np.testing.assert_allclose(lim.option_probabilities(scores + 7.0), probs)


def test_amplification_of_an_unbiased_generator_is_about_zero():
  _, train = lim.bias_sentences(4000, 0.7, seed=0)
  np.testing.assert_allclose(lim.bias_scores(train)[0], [0.7, 0.3], atol=0.03)
  # A generator that samples roles at the training rates: amplification ~ 0.
  rng = np.random.default_rng(0)
  rates = train / train.sum(axis=0, keepdims=True)  # p(role | group)
  gen = np.zeros_like(train)
  for g in range(2):
    draws = rng.choice(2, size=20000, p=rates[:, g])
    gen[:, g] = np.bincount(draws, minlength=2)
  assert abs(lim.bias_amplification(train, gen)) < 0.02
  # Always the majority role of each group (greedy decoding): each role is all one group,
  # so b~ = 1 where b* = 0.7: amplification 0.3.
  greedy = np.array([[100, 0], [0, 100]])
  exact = np.array([[70, 30], [30, 70]])
  assert lim.bias_amplification(exact, greedy) == pytest.approx(0.3)
  assert lim.bias_amplification(exact, exact) == pytest.approx(0.0)


def test_arithmetic_formats_hold_the_same_tokens():
  rng = random.Random(0)
  for k in (1, 2, 3, 4):
    c = lim.make_chain(k, rng)
    a, s = lim.chain_text(c, 'answer_first'), lim.chain_text(c, 'steps_first')
    assert sorted(a.split()) == sorted(s.split()) and a != s
    assert len(c.ops) == k and all(0 <= v <= 99 for v in c.values)
    assert lim.parse_answer('steps_first', s[len(lim.chain_prompt(c, 'steps_first')):]) \
        == c.answer
    assert lim.parse_answer('answer_first', a[len(lim.chain_prompt(c, 'answer_first')):]) \
        == c.answer
  with pytest.raises(ValueError, match='format'):
    lim.chain_text(c, 'both')


def test_unknown_part_is_an_error_before_anything_is_written(tmp_path):
  from configs import limitations as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import common, limitations  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config('test')
  config.parts = 'hallucination,telepathy'
  with pytest.raises(common.UserError, match='telepathy'):
    limitations.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_think_arms_get_their_own_model_size():
  from configs import limitations as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import limitations  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config('default').to_dict()
  arm = limitations.think_arm_config(config)
  assert arm['model'] == dict(config['model'], **config['think']['model'])
  assert arm['model']['d_model'] != config['model']['d_model']
  assert config['model']['d_model'] == 96  # the other parts keep theirs
  cfg = limitations.lm_config(arm, 512, config['think']['steps'])
  assert (cfg['model']['d_model'], cfg['model']['num_layers']) == (128, 3)
  assert cfg['optimizer']['total_steps'] == cfg['train']['steps'] == 1500

