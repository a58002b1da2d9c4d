"""The lm-evaluation-harness bridge on a tiny trained model: its log-likelihoods are
research/evaluation.py's, an answer does not depend on batch size or padding side,
generation stops at the until-strings, and a local YAML task runs end to end."""
import json
import os
import pathlib

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from research import chat as chat_lib
from research import checkpoint as checkpoint_lib
from research import evaluation
from research import lm_eval_model
from tests.test_pretrain import tiny_pretrain_workdir

PAIRS = [('The nation', ' will work for peace.'), ('Congress', ' and the people'),
         ('The great public law of the', ' union'), ('War', ' is not peace.'),
         ('In the year of trade the men and the government of the states', ' work'),
         ('The', ' power')]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return tiny_pretrain_workdir(tmp_path_factory.mktemp('lm_eval'), seq_len=64, d_model=32,
                               num_layers=2, steps=6)


@pytest.fixture(scope='module')
def learned_workdir(workdir, tmp_path_factory):
  """The tiny run's tokenizer with a random learned-position model (positions matter)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from research import model as model_lib  # pylint: disable=g-import-not-at-top
  _, config, tokenizer = checkpoint_lib.load_stage(workdir)
  config = dict(config, model=dict(config['model'], position='learned'))
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  z = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model_lib.Transformer(cfg).init(jax.random.key(3), z, z, z,
                                                    jnp.zeros((1, 8), bool))['params'])
  params = jax.tree.map(lambda x: x * 10, params)  # far from uniform
  return checkpoint_lib.save_params_stage(tmp_path_factory.mktemp('learned') / 'run', config,
                                          tokenizer, params, step=1)


@pytest.fixture(scope='module')
def lm(workdir):
  return lm_eval_model.ResearchLM(workdir=str(workdir), batch_size=4)


def requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.slow
def test_loglikelihoods_equal_evaluation_choice_scores(lm):
  """The bridge's log p(continuation | context) is choice_scores' on the same ids, and
  loglikelihood_rolling of a short text is its log-likelihood after eos."""
  got = lm.loglikelihood(requests('loglikelihood', PAIRS))
  rows = [evaluation.choice_rows(*lm._encode_pair(c, x), lm.max_length) for c, x in PAIRS]
  want = evaluation.choice_scores(lm.params, lm.cfg, rows, mode='causal', batch_size=4)
  np.testing.assert_allclose([g[0] for g in got], want, atol=1e-4)
  assert all(isinstance(g[1], bool) for g in got)
  text = 'The nation will work for peace.'
  rolling = lm.loglikelihood_rolling(requests('loglikelihood_rolling', [(text,)]))[0]
  after_eos = lm.loglikelihood(requests('loglikelihood', [('', text)]))[0][0]
  np.testing.assert_allclose(rolling, after_eos, atol=1e-4)


def test_rolling_windows_predict_every_token_once(lm):
  """A text longer than the context is scored in windows: same total as token-by-token
  scoring with the same windows' contexts, every token counted once (< 0 each)."""
  text = ' '.join(['the people of the union work for peace and trade'] * 12)
  ids = lm.tok_encode(text)
  assert len(ids) > 2 * lm.max_length
  total = lm.loglikelihood_rolling(requests('loglikelihood_rolling', [(text,)]))[0]
  one_window = lm.score_tokens([([lm.eot_token_id] + ids[:lm.max_length - 2],
                                 ids[lm.max_length - 2:lm.max_length - 1])])[0][0]
  assert total < one_window < 0
  # Per-token mean within the range of a short text's: no token scored twice or skipped.
  short = lm.score_tokens([([lm.eot_token_id], ids[:lm.max_length - 1])])[0][0]
  assert 0.5 < (total / len(ids)) / (short / (lm.max_length - 1)) < 2


@pytest.mark.parametrize('batch_size, padding_side, position', [
    (1, 'right', 'rope'), (3, 'left', 'rope'), (3, 'left', 'learned')])
@pytest.mark.slow
def test_choice_does_not_depend_on_batch_or_padding(workdir, learned_workdir, lm, batch_size,
                                                    padding_side, position):
  run = str(workdir if position == 'rope' else learned_workdir)
  if position != 'rope':
    lm = lm_eval_model.ResearchLM(workdir=run, batch_size=4)
  reference = lm.loglikelihood(requests('loglikelihood', PAIRS))
  other = lm_eval_model.ResearchLM(workdir=run, batch_size=batch_size,
                                   padding_side=padding_side)
  got = other.loglikelihood(requests('loglikelihood', PAIRS))
  np.testing.assert_allclose([g[0] for g in got], [r[0] for r in reference], atol=1e-4)
  # One multiple-choice item: its choices among other rows of other lengths.
  item = [('The nation', c) for c in (' will work.', ' is the law of the land', ' war')]
  scores = [other.loglikelihood(requests('loglikelihood', item + PAIRS))[i][0] for i in range(3)]
  ref = [lm.loglikelihood(requests('loglikelihood', item))[i][0] for i in range(3)]
  assert int(np.argmax(scores)) == int(np.argmax(ref))
  np.testing.assert_allclose(scores, ref, atol=1e-4)


def test_generate_until_stops_at_the_until_strings(lm):
  free = lm.generate_until(requests('generate_until', [
      ('The nation', {'until': [], 'max_gen_toks': 12})]))[0]
  assert len(free) > 4, free
  stop = free[len(free) // 2:len(free) // 2 + 2]
  cut = lm.generate_until(requests('generate_until', [
      ('The nation', {'until': [stop], 'max_gen_toks': 12}),
      ('Congress', {'until': ['zzz-never'], 'max_gen_toks': 12})]))
  assert cut[0] == free[:free.index(stop)]
  assert stop not in cut[0]


def test_chat_template_is_our_render(lm):
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'Hello there, how are you?'}]
  text = lm.apply_chat_template(messages)
  expected = chat_lib.render(lm.tokenizer, messages, add_generation_prompt=True).ids
  assert lm.tok_encode(text) == expected.tolist()
  with pytest.raises(ValueError, match='role'):
    lm.apply_chat_template([{'role': 'robot', 'content': 'x'}])


def test_bad_workdir_and_args_are_one_line_errors(tmp_path, workdir):
  with pytest.raises(checkpoint_lib.CheckpointError, match='config.json'):
    lm_eval_model.ResearchLM(workdir=str(tmp_path))
  with pytest.raises(ValueError, match='padding_side'):
    lm_eval_model.ResearchLM(workdir=str(workdir), padding_side='middle')


def write_tiny_task(root: pathlib.Path) -> pathlib.Path:
  """A user's own task: a JSONL file and a YAML file, no code."""
  rows = [dict(q='The nation', choices=[' will work for peace.', ' zq xv'], label=0),
          dict(q='Congress', choices=[' and the people', ' qqq'], label=0),
          dict(q='War', choices=[' is not peace.', ' peace'], label=1)]
  (root / 'tiny.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (root / 'tiny_mc.yaml').write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'tiny.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
""")
  (root / 'tiny_gen.yaml').write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'tiny.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
  return root


@pytest.mark.slow
def test_local_task_runs_end_to_end(lm, tmp_path, monkeypatch):
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
  write_tiny_task(tmp_path)
  manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
  out = lm_eval.simple_evaluate(model=lm, tasks=['tiny_mc', 'tiny_gen'], task_manager=manager,
                                log_samples=True)
  assert out['results']['tiny_mc']['acc,none'] in (0, 1 / 3, 2 / 3, 1)
  assert 'exact_match,none' in out['results']['tiny_gen']
  assert len(out['samples']['tiny_mc']) == 3
  # The harness's answers are the bridge's own scores.
  doc0 = out['samples']['tiny_mc'][0]
  context, continuation = doc0['arguments'][0]
  assert context == 'The nation' and continuation.endswith(' will work for peace.')
  direct = lm.loglikelihood(requests('loglikelihood', [(context, continuation)]))
  np.testing.assert_allclose(float(doc0['resps'][0][0][0]), direct[0][0], atol=1e-5)


def test_evaluate_tables_have_intervals_and_chance():
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  samples = [dict(acc=float(i < 6), arguments=[('q', ' a')] * (2 if i % 2 else 4),
                  filter='none', target=0) for i in range(10)]
  gen = [dict(exact_match=float(i < 3), filter='strict', target=str(i % 3 == 0),
              arguments=[('q', {})]) for i in range(8)]
  results = dict(results={'mc': {'acc,none': 0.6, 'acc_stderr,none': 0.16},
                          'gen': {'exact_match,strict': 0.375},
                          'group': {'acc,none': 0.5}},
                 samples={'mc': samples, 'gen': gen},
                 configs={'mc': dict(output_type='multiple_choice'),
                          'gen': dict(output_type='generate_until')})
  rows = {r['task']: r for r in evaluate.score_rows(results)}
  assert set(rows) == {'mc', 'gen'}  # a group's aggregate has no samples of its own
  assert rows['mc']['n'] == 10 and rows['mc']['interval'] == 'wilson'
  assert (rows['mc']['lo'], rows['mc']['hi']) == pytest.approx(evaluation.wilson_interval(6, 10))
  assert rows['mc']['chance'] == pytest.approx((5 * 0.5 + 5 * 0.25) / 10)
  assert rows['gen']['chance'] == pytest.approx(5 / 8)  # 'False' is the common target
  table = evaluate.comparison_table({'pre': list(rows.values()), 'sft': [rows['mc']]})
  assert '| mc | acc | 0.375 | 0.600 [' in table and '| —' in table


def test_evaluate_rejects_a_bad_workdir_before_writing(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--workdir={tmp_path}',
                        f'--out_dir={tmp_path / "eval"}'], cwd=pathlib.Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'config.json' in out.stderr and len(out.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'eval').exists()
