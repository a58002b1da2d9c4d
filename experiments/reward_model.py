"""Reward model: an SFT (or pretrained) Transformer + a scalar head, trained on preferences.

  python -m experiments.reward_model --config=configs/reward_model.py:hh \
      --init=runs/sft --workdir=runs/reward_model

Starts from the init workdir's params, config and tokenizer (the Orbax handoff) with a
fresh scalar head (`reward_model.with_scalar_head`), and trains it with the
Bradley-Terry loss (`reward_model.make_reward_train_step`) through the same sharded
jitted step, checkpoints and resume as the other stages. Pairs come from hh-rlhf or a
JSONL file (research/preferences.py), whole prompts held out; each side is the chat
rendering of prompt + reply, cut from the left, scored at its last token.

Batches are a seeded shuffle of the training pairs, one permutation per epoch: step s
reads positions [s·B, (s+1)·B) of the endless sequence of epochs, so resuming needs
only the step (the position is also saved in each checkpoint's meta).

After training: held-out pairwise accuracy (95 % Wilson interval), mean margin, score
mean/std, and the score offset (mean score on the training pairs, `reward_model.
score_offset`), which is saved in the final checkpoint's meta and summary.json. The
workdir is a stage: `checkpoint.load_reward_model(workdir)` -> (params, cfg, tokenizer, offset).
"""
import copy
import hashlib
import json
import pathlib
import time

import flax.linen as nn
import jax
import numpy as np
from experiments import common
from experiments import loop as loop_lib
from experiments import reward_model_report
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import flops as flops_lib
from research import model as model_lib
from research import preferences
from research import reward_model
from research import sharding as sharding_lib
from research import train_step as train_lib

SUMMARY_FILE = reward_model_report.SUMMARY_FILE
REPORT_FILE = reward_model_report.REPORT_FILE


# ----------------------------------------------------------------------------
# Config and data.


def _merge(base: dict, over: dict) -> dict:
  out = copy.deepcopy(base)
  for k, v in over.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def resolve_config(config) -> dict:
  """A plain dict: `config` (ConfigDict or dict, possibly partial) over the preset's defaults."""
  from configs import reward_model as rm_config  # pylint: disable=g-import-not-at-top
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return _merge(rm_config.get_config(config.get('preset', 'hh')).to_dict(), config)


def _arrays(d) -> dict:
  """The four pair arrays of a tokenised dict (anything else in it is ignored)."""
  if d is None:
    return None
  return {k: np.asarray(d[k], np.int32) for k in preferences.ARRAY_KEYS}


def fingerprint(arrays) -> str:
  h = hashlib.sha256()
  for d in arrays:
    for k in preferences.ARRAY_KEYS:
      if d is not None:
        h.update(np.ascontiguousarray(d[k]).tobytes())
  return h.hexdigest()[:16]


def _fit(arrays: dict, width: int) -> dict:
  """Arrays cut or padded to `width` columns (a caller's arrays may be narrower/wider)."""
  out = dict(arrays)
  for side in ('chosen', 'rejected'):
    tokens, lengths = arrays[f'{side}_tokens'], arrays[f'{side}_lengths']
    if tokens.shape[1] > width:
      if int(lengths.max(initial=0)) > width:
        raise common.UserError(f'pairs have {side} sequences of {int(lengths.max())} tokens, '
                               f'more than data.seq_len={width}')
      tokens = tokens[:, :width]
    out[f'{side}_tokens'] = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
  return out


def take(arrays: dict, idx) -> dict:
  return {k: v[idx] for k, v in arrays.items()}


def make_score_fn(model):
  """(params, batch) -> (chosen scores, rejected scores) as numpy, jitted. Every process
  passes the same whole batch and gets every score (params may be mesh-sharded across
  processes: `sharding.host_local` gathers what a process cannot read)."""
  jitted = jax.jit(lambda params, batch: reward_model.pair_scores(params, model, batch))
  return lambda params, batch: sharding_lib.host_local(jitted(params, batch))


# ----------------------------------------------------------------------------
# Training.


def _prepare(config: dict, workdir: pathlib.Path, init_workdir, pairs):
  """Init params with a head, model config, tokenizer, (train, held-out) arrays, data stats."""
  init_params, init_config, tokenizer = checkpoint_lib.load_stage(init_workdir)
  config['model'] = dict(init_config['model'], scalar_head=True)
  config['tokenizer'] = dict(init_config.get('tokenizer', {}), path=str(init_workdir))
  config['init'] = str(init_workdir)
  dc = config['data']
  if dc['seq_len'] > config['model']['max_len']:
    raise common.UserError(f'data.seq_len={dc["seq_len"]} exceeds the init model\'s max_len '
                           f'{config["model"]["max_len"]}')
  if pairs is not None:
    train_arrays, held_arrays = (_arrays(x) for x in pairs)
    train_arrays = _fit(train_arrays, dc['seq_len'])
    held_arrays = _fit(held_arrays, dc['seq_len']) if held_arrays is not None else None
    dc['source'] = 'arrays'
    dc['pairs_fingerprint'] = fingerprint((train_arrays, held_arrays))
    stats = {'source': 'arrays'}
  else:
    try:
      train_pairs, held_pairs, stats, problems = preferences.load_configured_pairs(
          dc, config['seed'])
      for p in problems:
        common.log(f'skipped: {p}')
      t0 = time.time()
      train_arrays = preferences.tokenize_pairs(tokenizer, train_pairs, dc['seq_len'])
      held_arrays = preferences.tokenize_pairs(tokenizer, held_pairs, dc['seq_len'])
    except preferences.PreferenceError as e:
      raise common.UserError(str(e)) from None
    stats.update(train_pairs=len(train_pairs), heldout_pairs=len(held_pairs),
                 dropped_after_truncation=train_arrays.counts['dropped']
                 + held_arrays.counts['dropped'],
                 truncated=train_arrays.counts['truncated'] + held_arrays.counts['truncated'],
                 tokenize_seconds=time.time() - t0)
    train_arrays, held_arrays = _arrays(train_arrays), _arrays(held_arrays)
  stats['train'] = preferences.num_pairs(train_arrays)
  stats['heldout'] = preferences.num_pairs(held_arrays)
  if not stats['train']:
    raise common.UserError('no training pairs left after filtering (check data.* and '
                           'data.heldout_fraction)')
  model_cfg = model_lib.TransformerConfig.from_dict(config['model'])
  head_std = config['train'].get('head_std', -1.0)
  params, head_cfg = reward_model.with_scalar_head(
      init_params, model_lib.TransformerConfig.from_dict(init_config['model']),
      jax.random.key(config['seed']), std=None if head_std is None or head_std < 0 else head_std)
  assert head_cfg == model_cfg, (head_cfg, model_cfg)
  return params, model_cfg, tokenizer, train_arrays, held_arrays, stats


def train(config, workdir, init_workdir, pairs=None) -> dict:
  """Trains (or resumes) a reward model in `workdir` from `init_workdir`'s params.

  Args:
    config: configs/reward_model.py's config (ConfigDict or dict; missing keys take the
      preset's defaults).
    workdir: this run's folder (resumed when it holds a checkpoint).
    init_workdir: a finished SFT / pretraining workdir (params, config, tokenizer).
    pairs: optional (train arrays, held-out arrays or None), dicts as returned by
      `preferences.tokenize_pairs` / `pairs_from_token_lists`; default: the pairs named
      by config['data'].

  Returns:
    The summary (also written to summary.json, with report.md): steps, train_accuracy,
    train {...}, heldout {accuracy, interval, margin, n, loss, score_mean, score_std,
    ...}, heldout_before, baselines, offset, data, minutes, interrupted.
  """
  t0 = time.time()
  config = resolve_config(config)
  common.validate_config(config)
  common.check_workdir(workdir)
  workdir = pathlib.Path(workdir)
  params0, model_cfg, tokenizer, train_arrays, held_arrays, stats = _prepare(
      config, workdir, init_workdir, pairs)
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, config, workdir,
                                    keys=('model', 'tokenizer', 'data', 'optimizer', 'seed'),
                                    ignore=checkpoint_lib.RESUMABLE_CHANGES)
    if saved.get('init') and (pathlib.Path(saved['init']).resolve()
                              != pathlib.Path(init_workdir).resolve()):
      raise checkpoint_lib.CheckpointError(
          f'workdir {workdir} was started from --init={saved["init"]}, not {init_workdir}: '
          'use a new --workdir')
  dc, tc, ec = config['data'], config['train'], config['eval']
  mesh = common.make_mesh(config['mesh']['shape'])
  model = model_lib.Transformer(model_cfg)
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(**config['optimizer']))
  batch, width = dc['batch_size'], dc['seq_len']
  shardings = train_lib.state_shardings(model, tx, mesh, batch, width)
  step_fn = train_lib.jit_train_step(reward_model.make_reward_train_step(model, tx, schedule),
                                     shardings, mesh, batch)
  score_fn = make_score_fn(model)

  # Nothing is written before every check above has passed.
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    if saved is None:
      checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
    if not (workdir / checkpoint_lib.TOKENIZER_FILE).exists():
      tokenizer.save(workdir / checkpoint_lib.TOKENIZER_FILE)

  n_train, n_held = stats['train'], stats['heldout']
  counts = flops_lib.param_counts(model_cfg)
  sampler = data_lib.EpochSampler(n_train, batch, config['seed'])
  rng = jax.random.key(config['seed'])
  extra = {}  # carried in every checkpoint's meta

  def heldout(step, state, prefix='eval/'):
    c, r = reward_model.score_pairs(score_fn, state.params, held_arrays, ec['batch_size']) \
        if n_held else ([], [])
    m = reward_model.pair_metrics(np.asarray(c), np.asarray(r))
    if n_held:
      loop.log(step, {k: v for k, v in m.items() if isinstance(v, (int, float))}, prefix)
    return m

  def heldout_hook(step, state):
    if step < tc['steps'] and n_held:
      m = heldout(step, state)
      common.log(f'\nstep {step}: held-out accuracy {m["accuracy"]:.3f} '
                 f'margin {m["margin"]:.3f}')

  def meta_fn(step, **more):
    return dict(seed=config['seed'], tokenizer_fingerprint=tokenizer.fingerprint,
                epoch=step * batch / n_train, config=config, **extra, **more)

  with loop_lib.Loop(workdir, steps=tc['steps'], checkpoint_every=tc['checkpoint_every'],
                     keep=tc['keep_checkpoints'], max_minutes=tc['max_minutes'],
                     log_every=tc['log_every'], units_per_step=batch, units_name='pairs',
                     save_final=False,
                     progress_fn=lambda m: (f'loss {m["loss"]:.3f} acc {m["accuracy"]:.3f} '
                                            f'{m["pairs_per_second"]:.1f} pairs/s')) as loop:
    shapes = nn.unbox(train_lib.abstract_train_state(model, tx, 1, width)[0])
    restored = loop.restore(checkpoint_lib.abstract_like(shardings, shapes), sampler)
    if restored is not None:
      checkpoint_lib.check_tokenizer(restored.meta, tokenizer, workdir)
      extra = {k: restored.meta[k] for k in ('heldout_before',) if k in restored.meta}
      state = restored.state
    else:
      state = train_lib.train_state_from_params(params0, tx, shardings, mesh)
    del params0
    common.log(f'reward model: {counts["total"] / 1e6:.2f}M params from {init_workdir}; '
               f'{n_train} train / {n_held} held-out pairs ({stats}); '
               f'batch {batch} pairs × {width} tokens, mesh {dict(mesh.shape)}')
    if restored is None and ec['before'] and n_held:
      extra['heldout_before'] = heldout(0, state, 'eval_before/')
      common.log(f'held-out accuracy with the untrained head: '
                 f'{extra["heldout_before"]["accuracy"]:.3f}')
    if tc['eval_every']:
      loop.add_hook(heldout_hook, every=tc['eval_every'])
    # The sampler yields the global batch's pair indices (its position is what the
    # checkpoint keeps); each process feeds only its rows of it (`jit_train_step` makes
    # them one global batch), so any process count trains on the same batches.
    rows = sharding_lib.process_rows(mesh, batch)
    result = loop.run(state, lambda state, idx: step_fn(state, take(train_arrays, idx[rows]),
                                                        rng),
                      sampler, first_step=int(state.step), meta_fn=meta_fn)
    state, step = result.state, result.step

    held_m = heldout(step, state)
    n_offset = n_train if not ec['train_pairs'] else min(ec['train_pairs'], n_train)
    offset_idx = np.sort(np.random.default_rng([config['seed'], 1 << 20]).permutation(
        n_train)[:n_offset])
    c, r = reward_model.score_pairs(score_fn, state.params, take(train_arrays, offset_idx),
                                    ec['batch_size'])
    train_m = reward_model.pair_metrics(c, r)
    offset = float(reward_model.score_offset(np.concatenate([c, r])))
    loop.log(step, dict(train_accuracy=train_m['accuracy'], offset=offset))
    if not result.interrupted:  # the finished model carries its offset
      loop.save(step, state, sampler, meta_fn(step, offset=offset, offset_pairs=n_offset))

  summary = dict(
      steps=step, interrupted=result.interrupted, train_accuracy=train_m['accuracy'],
      train=train_m, heldout=held_m, heldout_before=extra.get('heldout_before'),
      baselines=dict(longer_wins=reward_model.longer_wins(held_arrays), chance=0.5),
      offset=offset, offset_pairs=n_offset, final_train_metrics=result.last_train, data=stats,
      params=counts, init=str(init_workdir), batch_size=batch, seq_len=width,
      train_seconds=result.seconds, minutes=(time.time() - t0) / 60, loop=result.record())
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / SUMMARY_FILE, summary)
    reward_model_report.write(workdir)
  return summary


# ----------------------------------------------------------------------------
# CLI.


def main(config, workdir):
  common.maybe_initialize_distributed()
  init = config.init  # --init=WORKDIR is short for --config.init (experiments.common)
  if not init:
    raise common.UserError('no init workdir: pass --init=runs/sft (a finished SFT or '
                           'pretraining run)')
  if not (pathlib.Path(init) / checkpoint_lib.CONFIG_FILE).exists():
    raise common.UserError(f'--init={init}: no {checkpoint_lib.CONFIG_FILE} there; is it a '
                           'finished run folder?')
  try:
    summary = train(config, workdir, init)
  except preferences.PreferenceError as e:
    raise common.UserError(str(e)) from None
  if jax.process_index() == 0:  # the only process that wrote it
    common.log('\n' + (pathlib.Path(workdir) / REPORT_FILE).read_text())
  common.log(json.dumps({k: summary[k] for k in ('steps', 'offset', 'minutes')}))


if __name__ == '__main__':
  common.run_experiment(main, 'configs/reward_model.py:hh', 'runs/reward_model')
