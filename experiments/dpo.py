"""DPO: a policy trained directly on preference pairs, from an SFT (or pretrained) run.

  python -m experiments.dpo --config=configs/dpo.py:hh --init=runs/sft --workdir=runs/dpo

Reads top to bottom: pairs (hh-rlhf or JSONL, research/preferences.py; whole prompts
held out) -> the reference log-probs of every pair, computed once from the init params
and stored with the pairs (reference_logprobs.npz; a resumed run reads them back) ->
DPO or IPO steps (research/dpo.py) on the shared loop, with the same sharded jitted
step, checkpoints and resume as the other stages -> held-out implicit-reward accuracy.

Batches are a seeded shuffle of the training pairs, one permutation per epoch (the
sampler's position is saved in each checkpoint). The workdir is a stage:
`checkpoint.load_stage(workdir)` -> (policy params, config, tokenizer).
"""
import json
import pathlib
import time

import flax.linen as nn
import jax
import numpy as np

from experiments import common
from experiments import loop as loop_lib
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import dpo
from research import model as model_lib
from research import preferences
from research import sharding as sharding_lib
from research import train_step as train_lib

SUMMARY_FILE = 'summary.json'
REFERENCE_FILE = 'reference_logprobs.npz'


def _pair_arrays(config, tokenizer, pairs) -> tuple[dict, dict, dict]:
  """(train arrays, held-out arrays, stats): given token arrays, or the configured pairs."""
  dc = config['data']
  if pairs is not None:
    train, held = pairs
    return dict(train), dict(held) if held is not None else None, {'source': 'arrays'}
  try:
    train_pairs, held_pairs, stats, problems = preferences.load_configured_pairs(
        dc, config['seed'])
    for p in problems:
      common.log(f'skipped: {p}')
    train = preferences.tokenize_pairs(tokenizer, train_pairs, dc['seq_len'])
    held = preferences.tokenize_pairs(tokenizer, held_pairs, dc['seq_len'])
  except preferences.PreferenceError as e:
    raise common.UserError(str(e)) from None
  return train, held, stats


def _with_reference(path, logprob_fn, ref_params, train, held, batch_size):
  """Train and held-out arrays with their reference log-probs: read from `path` when a
  previous call stored them, else computed once (`dpo.reference_logprobs`) and stored."""
  if path.exists():
    with np.load(path) as z:
      split = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
      return split('train/'), split('held/')
  train = dpo.reference_logprobs(logprob_fn, ref_params, train, batch_size)
  held = dpo.reference_logprobs(logprob_fn, ref_params, held, batch_size)
  if jax.process_index() == 0:
    tmp = path.with_suffix('.tmp.npz')
    np.savez(tmp, **{f'train/{k}': v for k, v in train.items()},
             **{f'held/{k}': v for k, v in held.items()})
    tmp.replace(path)
  return train, held


def train(config, workdir, init_workdir, pairs=None) -> dict:
  """Trains (or resumes) a DPO policy in `workdir` from `init_workdir`'s params.

  Args:
    config: configs/dpo.py's config (ConfigDict or dict).
    workdir: this run's folder (resumed when it holds a checkpoint).
    init_workdir: a finished SFT / pretraining workdir: the policy's start and π_ref.
    pairs: optional (train arrays, held-out arrays), dicts of `preferences.ARRAY_KEYS`
      (`tokenize_pairs` / `pairs_from_token_lists`); default: config['data']'s pairs.

  Returns:
    The summary (also summary.json): steps, heldout {accuracy, margin, n} after training,
    heldout_before (at the reference: accuracy ½ by ties), data, loop, minutes.
  """
  t0 = time.time()
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  workdir = pathlib.Path(workdir)
  init_params, init_config, tokenizer = checkpoint_lib.load_stage(init_workdir)
  config['model'] = dict(init_config['model'])
  config['tokenizer'] = dict(init_config.get('tokenizer', {}), path=str(init_workdir))
  config['objective'] = {'name': 'supervised'}  # a policy that continues chat left to right
  config['init'] = str(init_workdir)
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, config, workdir, keys=('model', 'tokenizer', 'dpo'))
  dc, tc, oc = config['data'], config['train'], config['dpo']
  model_cfg = model_lib.TransformerConfig.from_dict(config['model'])
  if dc['seq_len'] > model_cfg.max_len:
    raise common.UserError(f'data.seq_len={dc["seq_len"]} exceeds the init model\'s max_len '
                           f'{model_cfg.max_len}')
  model = model_lib.Transformer(model_cfg)
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(**config['optimizer']))
  try:
    step = dpo.make_dpo_train_step(model, tx, schedule, float(oc['beta']), oc['loss'])
  except ValueError as e:
    raise common.UserError(str(e)) from None
  mesh = common.make_mesh(config['mesh']['shape'])
  batch, width = dc['batch_size'], dc['seq_len']
  shardings = train_lib.state_shardings(model, tx, mesh, batch, width)
  step_fn = train_lib.jit_train_step(step, shardings, mesh, batch)
  # Every process passes the same whole batch and gets every row's log-probs (params
  # may be mesh-sharded across processes: `host_local` gathers them).
  jitted_logprobs = jax.jit(lambda params, b: dpo.pair_logprobs(params, model, b))
  logprob_fn = lambda params, b: sharding_lib.host_local(jitted_logprobs(params, b))

  # Pairs, then the reference log-probs (once per workdir).
  workdir.mkdir(parents=True, exist_ok=True)
  train_arrays, held_arrays, stats = _pair_arrays(config, tokenizer, pairs)
  if held_arrays is None:
    held_arrays = {k: np.asarray(v)[:0] for k, v in train_arrays.items()}
  train_arrays, held_arrays = _with_reference(workdir / REFERENCE_FILE, logprob_fn, init_params,
                                              train_arrays, held_arrays,
                                              config['eval']['batch_size'])
  n_train, n_held = len(train_arrays[dpo.START_KEY]), len(held_arrays[dpo.START_KEY])
  stats.update(train=n_train, heldout=n_held)
  if not n_train:
    raise common.UserError('no training pairs (check data.* and data.heldout_fraction)')
  if jax.process_index() == 0:
    if saved is None:
      checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
    if not (workdir / checkpoint_lib.TOKENIZER_FILE).exists():
      tokenizer.save(workdir / checkpoint_lib.TOKENIZER_FILE)

  sampler = data_lib.EpochSampler(n_train, batch, config['seed'])
  rng = jax.random.key(config['seed'])
  heldout = lambda params: dpo.implicit_reward_accuracy(
      logprob_fn, params, held_arrays, config['eval']['batch_size'], float(oc['beta']))

  def heldout_hook(step, state):
    if step < tc['steps'] and n_held:
      m = heldout(state.params)
      loop.log(step, {k: v for k, v in m.items() if v is not None})
      common.log(f'\nstep {step}: held-out implicit-reward accuracy {m["accuracy"]:.3f}')

  meta_fn = lambda step: dict(seed=config['seed'], tokenizer_fingerprint=tokenizer.fingerprint,
                              epoch=step * batch / n_train, config=config)
  with loop_lib.Loop(workdir, steps=tc['steps'], checkpoint_every=tc['checkpoint_every'],
                     keep=tc['keep_checkpoints'], max_minutes=tc['max_minutes'],
                     log_every=tc['log_every'], units_per_step=batch, units_name='pairs',
                     progress_fn=lambda m: (f'loss {m["loss"]:.3f} acc {m["accuracy"]:.3f} '
                                            f'margin {m["margin"]:.3f}')) as loop:
    shapes = nn.unbox(train_lib.abstract_train_state(model, tx, 1, width)[0])
    restored = loop.restore(checkpoint_lib.abstract_like(shardings, shapes), sampler)
    if restored is not None:
      checkpoint_lib.check_tokenizer(restored.meta, tokenizer, workdir)
      state = restored.state
    else:
      state = train_lib.train_state_from_params(init_params, tx, shardings, mesh)
    before = heldout(init_params)
    del init_params
    common.log(f'dpo ({oc["loss"]}, β {oc["beta"]}) from {init_workdir}: {n_train} train / '
               f'{n_held} held-out pairs ({stats}); batch {batch} pairs × {width} tokens')
    if tc['eval_every']:
      loop.add_hook(heldout_hook, every=tc['eval_every'])
    # The sampler draws the global batch; each process feeds only its rows of it.
    rows = sharding_lib.process_rows(mesh, batch)
    batches = ({k: v[idx[rows]] for k, v in train_arrays.items()} for idx in sampler)
    result = loop.run(state, lambda state, b: step_fn(state, b, rng),
                      _Sampled(sampler, batches), first_step=int(state.step),
                      meta_fn=meta_fn)
    held_m = heldout(result.state.params)
    loop.log(result.step, {k: v for k, v in held_m.items() if v is not None})

  summary = dict(steps=result.step, interrupted=result.interrupted, heldout=held_m,
                 heldout_before=before, loss=oc['loss'], beta=oc['beta'], data=stats,
                 init=str(init_workdir), batch_size=batch, seq_len=width,
                 final_train_metrics=result.last_train, train_seconds=result.seconds,
                 minutes=(time.time() - t0) / 60, loop=result.record())
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / SUMMARY_FILE, summary)
  return summary


class _Sampled:
  """Batches drawn by an EpochSampler: iterates the batches, checkpoints the sampler."""

  def __init__(self, sampler, batches):
    self.sampler, self.batches = sampler, batches

  def __next__(self):
    return next(self.batches)

  def get_state(self):
    return self.sampler.get_state()

  def set_state(self, state):
    self.sampler.set_state(state)


def main(config, workdir):
  common.maybe_initialize_distributed()
  if not config.init:
    raise common.UserError('no init workdir: pass --init=runs/sft (a finished SFT or '
                           'pretraining run)')
  if not (pathlib.Path(config.init) / checkpoint_lib.CONFIG_FILE).exists():
    raise common.UserError(f'--init={config.init}: no {checkpoint_lib.CONFIG_FILE} there; is it '
                           'a finished run folder?')
  summary = train(config, workdir, config.init)
  common.log(json.dumps({k: summary[k] for k in ('steps', 'heldout', 'heldout_before',
                                                 'minutes')}))


if __name__ == '__main__':
  common.run_experiment(main, 'configs/dpo.py:hh', 'runs/dpo')
