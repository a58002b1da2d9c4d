"""The objective-comparison study: equal budgets asserted, and a 2-arm × 1-seed micro
study end to end on a tiny synthetic corpus that writes report.md and, restarted,
neither retrains nor re-evaluates what is finished."""
import json
import pathlib
import random

import numpy as np
import pytest

from configs import compare_objectives as study_config
from experiments import common
from experiments import compare_objectives as study
from experiments import compare_objectives_report as study_report
from research import data as data_lib
from research import tokenizer as tokenizer_lib

WORDS = ('the nation people congress year government states war peace law trade men '
         'work union great public country free power act time duty world').split()


def write_corpus(path: pathlib.Path, docs=60, seed=0) -> pathlib.Path:
  """A .jsonl corpus whose documents carry a `year` (the era task's label)."""
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for i in range(docs):
      text = ' '.join(' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize()
                      + '.' for _ in range(rng.randint(15, 30)))
      f.write(json.dumps({'text': text, 'year': 1790 + 4 * i}) + '\n')
  return path


MICRO = {
    'arms': "('causal','masked15')", 'seeds': '(0,)',
    'pretrain.data.seq_len': 32, 'pretrain.data.batch_size': 8,
    'pretrain.data.validation_fraction': 0.3, 'pretrain.tokenizer.vocab_size': 512,
    'pretrain.model.d_model': 32, 'pretrain.model.num_layers': 1, 'pretrain.train.steps': 4,
    'pretrain.train.eval_every': 2, 'pretrain.train.checkpoint_every': 2,
    'pretrain.train.eval_batches': 1, 'pretrain.optimizer.warmup_steps': 1,
    'eval.loss_batches': 2, 'eval.adapt_steps': 2, 'eval.pll_passages': 2, 'eval.batch_size': 16,
    'era.num_bins': 2, 'era.passage_len': 16, 'era.train_per_class': 8, 'era.test_per_class': 4,
    'era.steps': 2, 'era.batch_size': 4,
    'era.attention': 'bidirectional',  # one fine-tuning compile for both arms: a faster test
}


def micro_config(corpus, **extra):
  config = study_config.get_config('cpu')
  for key, value in {**MICRO, 'pretrain.data.corpus': corpus, 'piqa.path': '/nonexistent',
                     **extra}.items():
    common.apply_override(config, key, str(value))
  return config


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus') / 'speeches.jsonl')


def test_budget_is_equal_across_all_arms_and_asserted(corpus, tmp_path):
  config = micro_config(corpus, arms=tuple(study_config.ARM_OBJECTIVES))
  docs = data_lib.load_corpus(str(corpus))
  tok = tokenizer_lib.train_tokenizer((d.text for d in docs), 512)
  tok.save(tmp_path / 'tok.model')
  rows = data_lib.pack_documents(tok, docs, 32)
  budgets = {arm: study.run_budget(study.arm_config(config, arm, 0, tmp_path / 'tok.model'), rows)
             for arm in config.arms}
  assert len(budgets) == 6
  study.check_equal_budget(budgets)  # no error
  first = budgets['causal']
  assert first['input_tokens'] == 4 * 8 * 32 and 0 < first['corpus_tokens'] <= 4 * 8 * 32
  assert all(b == first for b in budgets.values())
  # A different seed draws other batches: the digest sees the data order.
  other = study.run_budget(study.arm_config(config, 'causal', 1, tmp_path / 'tok.model'), rows)
  assert other['data_order'] != first['data_order']
  # Any arm that would see more tokens, or other batches, voids the comparison.
  bigger = study.arm_config(config, 'masked40', 0, tmp_path / 'tok.model')
  bigger.data.batch_size = 16
  with pytest.raises(study.BudgetError, match='input_tokens|steps|corpus_tokens'):
    study.check_equal_budget({**budgets, 'masked40': study.run_budget(bigger, rows)})
  with pytest.raises(study.BudgetError, match='data_order'):
    study.check_equal_budget({'causal': first, 'masked15': {**first, 'data_order': 'x'}})


@pytest.mark.slow
def test_micro_study_end_to_end_and_restart_skips_finished_runs(corpus, tmp_path, monkeypatch):
  config = micro_config(corpus)
  workdir = tmp_path / 'study'
  results = study.run_study(config, workdir)
  report = (workdir / 'report.md').read_text()
  assert set(results) == {'causal', 'masked15', study.RANDOM}
  for heading in ('| metric | causal | masked15 | random_init |',
                  '## Agreement with the published findings', 'PIQA skipped'):
    assert heading in report
  assert (workdir / 'loss_vs_flops.png').stat().st_size > 0
  assert (workdir / 'downstream.png').stat().st_size > 0
  # The report is rebuilt from the study's files alone, identically.
  (workdir / 'report.md').unlink()
  (workdir / 'downstream.png').unlink()
  assert study_report.main(['report', f'--workdir={workdir}']) == 0
  assert (workdir / 'report.md').read_text() == report
  assert (workdir / 'downstream.png').stat().st_size > 0
  metrics = results['causal'][0]['metrics']
  for key in ('causal_loss', 'causal_loss_adapted', 'cloze_accuracy', 'pll_word_l2r',
              'era_finetune_accuracy', 'era_probe_accuracy'):
    assert key in metrics
  assert results['causal'][0]['realised']['input_tokens'] == 4 * 8 * 32

  # Restart: nothing is retrained or re-evaluated.
  def fail(*args, **kwargs):
    raise AssertionError('a finished run was redone')
  monkeypatch.setattr(study.pretrain, 'train', fail)
  evaluated = workdir / 'masked15' / 'seed0' / 'evaluation.json'
  before = evaluated.read_text()
  with monkeypatch.context() as m:
    m.setattr(study, 'evaluate_params', fail)
    study.run_study(config, workdir)
  assert evaluated.read_text() == before
  # A lost evaluation is redone from the finished checkpoint, still without training.
  evaluated.unlink()
  study.run_study(config, workdir)
  assert json.loads(evaluated.read_text())['metrics'].keys() == json.loads(before)['metrics'].keys()


def _fake_results(seeds=(0, 1, 2)):
  """Per-arm metrics with known orderings: causal best at generation, masked better
  fine-tuned, 40 % and 15 % indistinguishable."""
  base = {'causal': (4.0, 4.0, 0.40), 'masked15': (7.0, 4.5, 0.50), 'masked40': (7.5, 4.6, 0.50),
          study.RANDOM: (7.6, 6.0, 0.30)}
  out = {}
  for arm, (loss, adapted, ft) in base.items():
    out[arm] = [dict(seed=s, train_seconds=1.0, eval_seconds=1.0, metrics=dict(
        causal_loss=loss + 0.01 * s, causal_loss_adapted=adapted + 0.01 * s,
        era_finetune_accuracy=ft + 0.01 * (s if arm != 'masked40' else 2 - s),
        era_probe_accuracy=ft, era_majority_accuracy=0.25)) for s in seeds]
  return out


def test_findings_and_table_from_paired_seeds():
  config = study_config.get_config('cpu')
  common.apply_override(config, 'arms', "('causal','masked15','masked40')")
  results = _fake_results()
  text = '\n'.join(study_report.findings(results, config))
  assert 'The causal arm is best without adaptation: agrees' in text
  assert 'Most of the MLM→CLM gap closed: agrees' in text  # 2.5 of 3.0 nats closed
  assert 'Fine-tuning accuracy, masked minus causal' in text and ': agrees.' in text
  assert 'no clear difference' in text  # 40 % vs 15 % fine-tuning: mean 0, spread > 0
  table = study_report.results_table(results, ['causal', 'masked15', 'masked40', study.RANDOM])
  assert '| 4.010 ± 0.010 [3.985, 4.035] |' in table  # causal loss: mean ± std [t-interval]
  one_seed = study_report.findings(_fake_results(seeds=(0,)), config)
  assert all(study_report.NOT_ENOUGH in f for f in one_seed)


def test_load_piqa_reads_examples_and_labels_in_order(shared_data, tmp_path):
  path = shared_data / 'piqa'
  examples, labels = study.load_piqa(path, max_examples=0)
  raw = [json.loads(line) for line in (path / 'valid.jsonl').read_text().splitlines()
         if line.strip()]
  raw_labels = [int(x) for x in (path / 'valid-labels.lst').read_text().split()]
  assert len(examples) == len(labels) == len(raw) == 1838
  np.testing.assert_array_equal(labels, raw_labels)
  assert set(np.unique(labels)) == {0, 1}
  for k in (0, 1, 917, 1837):  # (goal, sol1, sol2) in the file's order
    assert examples[k] == (raw[k]['goal'], raw[k]['sol1'], raw[k]['sol2'])
  first, first_labels = study.load_piqa(path, max_examples=5)
  assert first == examples[:5] and list(first_labels) == list(labels[:5])
  assert study.load_piqa(tmp_path / 'absent', 0) == (None, None)
  (tmp_path / 'valid.jsonl').write_text((path / 'valid.jsonl').read_text().splitlines()[0])
  (tmp_path / 'valid-labels.lst').write_text('0\n1\n')
  with pytest.raises(data_lib.DataError, match='1 examples but 2 labels'):
    study.load_piqa(tmp_path, 0)
