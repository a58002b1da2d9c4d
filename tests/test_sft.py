"""Supervised fine-tuning end to end on a tiny model, the chat CLI, and the SFT objective."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft as sft_config
from experiments import chat as chat_cli
from experiments import common
from experiments import loop as loop_lib
from experiments import sft
from experiments import sft_report
from research import checkpoint as checkpoint_lib
from research import model as model_lib
from research import objectives
from tests.test_pretrain import tiny_pretrain_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set(config, **values):
  for name, value in values.items():
    common.apply_override(config, name.replace('__', '.'), str(value))
  return config


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp('sft')
  tiny_pretrain_workdir(root, seq_len=192, d_model=48, num_layers=2, steps=6)
  return root


def sft_config_for(steps, **extra):
  config = sft_config.get_config('test')
  _set(config, data__seq_len=192, data__num_train=240, data__weights__chatterbot=0.0,
       data__weights__gsm8k=0.0, data__word_problems__num_train=240, train__steps=steps,
       eval__word_problems_per_k=2, eval__max_new_tokens=8, optimizer__learning_rate=3e-3,
       **extra)
  return config


def test_supervised_objective_scores_only_marked_next_tokens():
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
  batch = dict(tokens=tokens, positions=jnp.arange(6)[None],
               segment_ids=jnp.array([[1, 1, 1, 1, 2, 2]]),
               loss_mask=jnp.array([[0, 0, 1, 1, 0, 1]], jnp.int32))
  ex = objectives.supervised(batch, jax.random.key(0), None)
  # Position i predicts token i+1: scored when token i+1 is marked and in the same segment.
  np.testing.assert_array_equal(ex['weights'], [[0, 1, 1, 0, 1, 0]])
  np.testing.assert_array_equal(ex['targets'][0, :5], tokens[0, 1:])


@pytest.mark.slow
def test_sft_lowers_heldout_assistant_loss_and_resumes(pretrained, tmp_path):
  init = pretrained / 'pretrain'
  params0, init_config, tok = checkpoint_lib.load_stage(init)
  cfg = model_lib.TransformerConfig.from_dict(init_config['model'])
  config = sft_config_for(steps=40)
  resolved = dict(config.to_dict(), init=str(init))
  _, held, _ = sft.load_sources(resolved)
  before = sft.heldout_losses(params0, cfg, tok, held, 192, 8)['word_problems']
  result = sft.finetune(config, tmp_path / 'sft', init)
  after = result['eval']['heldout_assistant_loss']['word_problems']
  assert after < before - 0.5, (before, after)
  assert set(result['eval']['word_problems_by_k']) == {1, 2, 3, 4}
  assert result['packing']['packed'] > 0
  # report.md is rebuilt from the run's files alone.
  sft_report.write(tmp_path / 'sft')
  text = (tmp_path / 'sft' / 'report.md').read_text()
  assert 'Held-out loss on assistant tokens' in text and '| word_problems |' in text
  # The workdir is a stage: params, config and tokenizer load back.
  params, saved, tok2 = checkpoint_lib.load_stage(tmp_path / 'sft')
  assert saved['init'] == str(init) and tok2.fingerprint == tok.fingerprint
  # A second call resumes the finished run instead of training again.
  again = sft.finetune(config, tmp_path / 'sft', init)
  assert again['train']['step'] == 40
  assert (again['train']['loop']['resumed_from'], again['train']['loop']['steps_run']) == (40, 0)
  assert again['eval']['heldout_assistant_loss'] == pytest.approx(
      result['eval']['heldout_assistant_loss'], rel=1e-5)

  # Killed after step 25 (checkpoint at 20, rows of 21-25 written), then resumed: it
  # restores step 20, takes steps 21-40 only, and ends with the uninterrupted run's
  # losses and params.
  killed = tmp_path / 'killed'
  kill_config = sft_config_for(steps=40, train__checkpoint_every=20, train__log_every=1)
  straight = tmp_path / 'straight'
  sft.finetune(kill_config, straight, init)
  with loop_lib.simulate_kill(25), pytest.raises(loop_lib.SimulatedKill):
    sft.finetune(kill_config, killed, init)
  assert checkpoint_lib.Checkpointer(killed).latest_step() == 20
  assert max(r['step'] for r in loop_lib.read_metrics(killed)) == 25
  resumed = sft.finetune(kill_config, killed, init)
  assert (resumed['train']['loop']['resumed_from'], resumed['train']['loop']['steps_run']) == (
      20, 20)
  train_losses = lambda w: [(r['step'], r['train/loss']) for r in loop_lib.read_metrics(w)
                            if 'train/loss' in r]
  assert train_losses(killed) == train_losses(straight)  # each step once, same losses
  jax.tree.map(np.testing.assert_array_equal, checkpoint_lib.load_stage(killed)[0],
               checkpoint_lib.load_stage(straight)[0])

  # The chat session: history kept across turns, /reset forgets it, tokens streamed.
  session = chat_cli.load_session(tmp_path / 'sft', temperature=0.0, max_new_tokens=6)
  pieces = []
  answer = session.reply('Ana has 3 apples. She buys 2 more. How many apples?', pieces.append)
  assert ''.join(pieces) == answer
  session.reply('And now?')
  assert [m['role'] for m in session.messages] == ['user', 'assistant'] * 2
  session.reset()
  assert session.messages == []
  # Greedy replies are deterministic and independent of earlier sessions.
  again = chat_cli.load_session(tmp_path / 'sft', temperature=0.0, max_new_tokens=6)
  assert again.reply('Ana has 3 apples. She buys 2 more. How many apples?') == answer

  # The one-shot CLI mode prints a reply and exits 0; a missing workdir is one line.
  out = subprocess.run([sys.executable, '-m', 'experiments.chat', f'--workdir={tmp_path / "sft"}',
                        '--prompt=Hello', '--max_new_tokens=4', '--temperature=0'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  bad = subprocess.run([sys.executable, '-m', 'experiments.chat',
                        f'--workdir={tmp_path / "nope"}', '--prompt=Hi'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.count('\n') == 1, bad.stderr


@pytest.mark.slow
def test_sft_input_errors(pretrained, tmp_path):
  # In process: the exceptions run_experiment prints as one line.
  config = sft_config.get_config('test')
  with pytest.raises(common.UserError, match='no init workdir'):
    sft.main(config, tmp_path / 'w')
  config.init = str(tmp_path / 'missing')
  with pytest.raises(checkpoint_lib.CheckpointError, match='missing'):
    sft.main(config, tmp_path / 'w')
  # Through the CLI: a malformed JSONL conversation is one line naming file and line.
  bad_jsonl = tmp_path / 'bad.jsonl'
  bad_jsonl.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                       '{"role": "assistant", "content": "hello"}]}\n{"messages": [{"role": '
                       '"wizard", "content": "x"}]}\n')
  out = subprocess.run([sys.executable, '-m', 'experiments.sft', '--config=configs/sft.py:test',
                        f'--workdir={tmp_path / "w"}', f'--init={pretrained / "pretrain"}',
                        '--config.data.weights.jsonl=1.0', f'--config.data.jsonl_path={bad_jsonl}',
                        '--config.data.seq_len=192'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.count('\n') == 1 and 'bad.jsonl:2' in out.stderr, out.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # nothing written before the checks
