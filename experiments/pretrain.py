"""Pretrain a Transformer with any objective; resumable, sharded, logged.

  python -m experiments.pretrain --config=configs/pretrain.py:tiny \
      --config.model.num_layers=4 --workdir=runs/x

Re-running with the same workdir resumes from its latest complete checkpoint
(SIGTERM / Ctrl-C save before exiting). The workdir then holds everything a later
stage needs: config.json, tokenizer.model, checkpoints/ (see research/checkpoint.py).
"""
import dataclasses
import json
import pathlib
import signal
import time

import flax.linen as nn
import grain
import jax
import numpy as np
from experiments import common
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import flops as flops_lib
from research import model as model_lib
from research import objectives as objectives_lib
from research import sampling
from research import tokenizer as tokenizer_lib
from research import train_step as train_lib

SAMPLE_PROMPTS = ('The Congress', 'In the year', 'We must')


@dataclasses.dataclass
class Setup:
  """Everything built from a config, before the first step."""
  config: dict
  model_cfg: model_lib.TransformerConfig
  tokenizer: tokenizer_lib.Tokenizer
  train_rows: data_lib.PackedCorpus
  validation_rows: data_lib.PackedCorpus


def _objective_kwargs(oc: dict) -> dict:
  name = oc['name']
  if name == 'masked':
    return dict(mask_rate=oc['mask_rate'])
  if name == 'hybrid':
    return dict(mask_rate=oc['mask_rate'], causal_fraction=oc['causal_fraction'])
  if name == 'span':
    return dict(noise_rate=oc['noise_rate'], mean_span=oc['mean_span'])
  return {}


def make_objective(objective_config: dict):
  try:
    return objectives_lib.get_objective(objective_config['name'],
                                        **_objective_kwargs(objective_config))
  except ValueError as e:
    raise common.UserError(f'objective.name: {e}') from None


def prepare(config: dict, workdir: pathlib.Path) -> Setup:
  """Tokenizer (trained once per workdir, or reused) and packed train/validation rows."""
  dc = config['data']
  docs = data_lib.load_corpus(dc['corpus'], text_field=dc['text_field'])
  # data.split_seed (optional) fixes the split across seeds, so a multi-seed study
  # holds out the same documents in every run.
  train_docs, val_docs = data_lib.split_documents(docs, dc['validation_fraction'],
                                                  seed=dc.get('split_seed', config['seed']))
  tok_path = workdir / checkpoint_lib.TOKENIZER_FILE
  if tok_path.exists():
    tokenizer = tokenizer_lib.Tokenizer.load(tok_path)
  elif config['tokenizer']['path']:
    tokenizer = tokenizer_lib.Tokenizer.load(config['tokenizer']['path'])
  else:
    t0 = time.time()
    try:
      tokenizer = tokenizer_lib.train_tokenizer((d.text for d in train_docs),
                                                config['tokenizer']['vocab_size'],
                                                seed=config['seed'])
    except ValueError as e:
      raise common.UserError(f'tokenizer.vocab_size: {e}') from None
    common.log(f'tokenizer: trained vocab {tokenizer.vocab_size} in {time.time() - t0:.1f}s')
  if tokenizer.vocab_size != config['tokenizer']['vocab_size']:
    raise common.UserError(f'tokenizer has vocab {tokenizer.vocab_size}, config says '
                           f'tokenizer.vocab_size={config["tokenizer"]["vocab_size"]}')
  try:
    model_cfg = model_lib.TransformerConfig.from_dict(config['model'])
  except (ValueError, TypeError) as e:
    raise common.UserError(f'model config: {e}') from None
  seq_len = dc['seq_len']
  return Setup(config=config, model_cfg=model_cfg, tokenizer=tokenizer,
               train_rows=data_lib.pack_documents(tokenizer, train_docs, seq_len),
               validation_rows=data_lib.pack_documents(tokenizer, val_docs, seq_len))


def make_eval_fn(model, objective, ids, z_loss):
  """Validation loss sums under the run's objective and under causal next-token loss."""
  causal = objectives_lib.get_objective('causal')

  @jax.jit
  def evaluate(params, batch, rng):
    out = {}
    for name, fn in (('objective', objective), ('causal', causal)):
      _, sums = train_lib.loss_sums(params, model, fn(batch, rng, ids), z_loss)
      out[name] = (sums['loss_sum'] - sums['z_loss_sum'], sums['tokens'])
    return out
  return evaluate


def evaluate(eval_fn, params, rows, batch_size, max_batches, seed) -> dict:
  totals = {'objective': [0.0, 0.0], 'causal': [0.0, 0.0]}
  for i, batch in enumerate(data_lib.eval_batches(rows, batch_size)):
    if max_batches and i >= max_batches:
      break
    out = eval_fn(params, batch, jax.random.key(seed + i))
    for k, (loss, n) in out.items():
      totals[k][0] += float(loss)
      totals[k][1] += float(n)
  return {f'{k}_loss': loss / max(n, 1.0) for k, (loss, n) in totals.items()}


def unigram_entropy(rows: data_lib.PackedCorpus, vocab_size: int) -> float:
  """Entropy (nats/token) of the corpus's token frequencies: the loss of a model that
  ignores context. A trained LM must end well below it."""
  tokens = rows.tokens[rows.segment_ids > 0]
  p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
  p = p[p > 0] / p.sum()
  return float(-(p * np.log(p)).sum())


class _Stop:
  """SIGTERM / Ctrl-C ask the loop to save and exit at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second Ctrl-C: give up now
      raise KeyboardInterrupt
    self.requested = True
    common.log(f'\nsignal {signum}: saving a checkpoint and exiting')

  def restore(self):
    for s, h in self._old.items():
      signal.signal(s, h)


def train(config, workdir) -> dict:
  """Runs (or resumes) pretraining in `workdir`; returns a summary dict."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  workdir = pathlib.Path(workdir)
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, config, workdir,
                                    keys=('model', 'tokenizer', 'objective'))
  mesh = common.make_mesh(config['mesh']['shape'])
  setup = prepare(config, workdir)
  summary, _ = run_training(setup, workdir, make_objective(config['objective']), mesh,
                            fresh_config=saved is None)
  return summary


def run_training(setup: Setup, workdir, objective, mesh, *, fresh_config: bool,
                 init_params=None, sample_prompts=SAMPLE_PROMPTS) -> tuple[dict, object]:
  """The training loop every stage shares: sharded jitted steps, evals, checkpoints, resume.

  `objective(batch, rng, ids)` turns a batch of `setup.train_rows` into inputs, targets
  and weights. A fresh run starts from `init_params` (a previous stage's) when given,
  else from a random init; a workdir with a checkpoint resumes from it. Returns
  (summary, final params).
  """
  config = setup.config
  tokenizer, model_cfg = setup.tokenizer, setup.model_cfg
  tc, dc = config['train'], config['data']
  model = model_lib.Transformer(model_cfg)
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(**config['optimizer']))
  shardings = train_lib.state_shardings(model, tx, mesh, dc['batch_size'], dc['seq_len'])
  if tc['grad_accum_steps'] < 1 or dc['batch_size'] % tc['grad_accum_steps']:
    raise common.UserError(f'train.grad_accum_steps={tc["grad_accum_steps"]} must divide '
                           f'data.batch_size={dc["batch_size"]}')
  ids = objectives_lib.SpecialIds.from_tokenizer(tokenizer)
  step_fn = train_lib.jit_train_step(
      train_lib.make_train_step(model, tx, schedule, objective, ids, z_loss=tc['z_loss'],
                                grad_accum_steps=tc['grad_accum_steps']), shardings, mesh)
  eval_fn = make_eval_fn(model, objective, ids, tc['z_loss'])

  # Nothing is written before every check above has passed.
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    if fresh_config:
      checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
    if not (workdir / checkpoint_lib.TOKENIZER_FILE).exists():
      tokenizer.save(workdir / checkpoint_lib.TOKENIZER_FILE)

  batch_per_host = dc['batch_size'] // jax.process_count()
  data_iter = data_lib.make_train_iterator(
      setup.train_rows, batch_per_host, seed=config['seed'],
      read_options=grain.ReadOptions(num_threads=dc['num_threads'],
                                              prefetch_buffer_size=dc['prefetch_buffer_size']))
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tc['keep_checkpoints'])
  rng = jax.random.key(config['seed'])
  latest = ckpt.latest_step()
  if latest is not None:
    boxed, _ = train_lib.abstract_train_state(model, tx, 1, dc['seq_len'])
    shapes = nn.unbox(boxed)
    state, meta = ckpt.restore(latest, checkpoint_lib.abstract_like(shardings, shapes), data_iter)
    checkpoint_lib.check_tokenizer(meta, tokenizer, workdir)
    common.log(f'resumed from step {latest}')
  elif init_params is not None:
    state = train_lib.train_state_from_params(init_params, tx, shardings, mesh)
  else:
    state = train_lib.make_train_state(model, tx, mesh, jax.random.fold_in(rng, 1 << 20),
                                       dc['batch_size'], dc['seq_len'])

  counts = flops_lib.param_counts(model_cfg)
  flops_per_token = flops_lib.train_flops_per_token(model_cfg, dc['seq_len'], 'palm')
  peak = common.device_peak_flops()
  common.log(f'model: {counts["total"] / 1e6:.2f}M params ({counts["non_embedding"] / 1e6:.2f}M '
             f'non-embedding), {flops_per_token / 1e6:.1f} MFLOP/token (palm: every matmul), '
             f'objective {config["objective"]["name"]}, mesh {dict(mesh.shape)}, '
             f'{setup.train_rows.num_tokens / 1e6:.2f}M train tokens')

  writer = common.MetricWriter(workdir)
  stop = _Stop()
  first_step = int(state.step)
  progress = common.Progress(tc['steps'], first_step)
  deadline = time.time() + 60 * tc['max_minutes'] if tc['max_minutes'] > 0 else None
  tokens_per_step = dc['batch_size'] * dc['seq_len']
  losses, eval_metrics, step = [], {}, first_step
  t_last, steps_since = time.time(), 0

  def meta(step):
    return dict(step=step, seed=config['seed'], tokenizer_fingerprint=tokenizer.fingerprint,
                config=config)

  def run_eval(step, max_batches=tc['eval_batches']):
    m = evaluate(eval_fn, state.params, setup.validation_rows, batch_per_host, max_batches,
                 seed=config['seed'])
    writer.write(step, m, prefix='eval/')
    return m

  try:
    while step < tc['steps']:
      batch = next(data_iter)
      state, metrics = step_fn(state, batch, rng)
      step += 1
      steps_since += 1
      if step % tc['log_every'] == 0 or step == tc['steps'] or step == first_step + 1:
        metrics = jax.device_get(metrics)
        now = time.time()
        tps = tokens_per_step * steps_since / max(now - t_last, 1e-9)
        metrics['tokens_per_second'] = tps
        metrics['achieved_flops'] = tps * flops_per_token
        if peak:
          metrics['mfu'] = metrics['achieved_flops'] / (peak * jax.device_count())
        losses.append((step, float(metrics['loss'])))
        writer.write(step, metrics, prefix='train/')
        progress.update(step, f'loss {metrics["loss"]:.3f} acc {metrics["accuracy"]:.3f} '
                        f'{tps:,.0f} tok/s')
        t_last, steps_since = now, 0
      if tc['eval_every'] and step % tc['eval_every'] == 0 and step < tc['steps']:
        eval_metrics = run_eval(step)
        common.log(f'\nstep {step}: validation {eval_metrics}')
      if step % tc['checkpoint_every'] == 0:
        ckpt.save(step, state, data_iter, meta(step))
      if stop.requested or (deadline and time.time() > deadline):
        break
    # Final save (also on a signal or the time limit), then wait for the async write.
    if ckpt.latest_step() != step:
      ckpt.save(step, state, data_iter, meta(step))
    ckpt.wait()
  finally:
    stop.restore()
    ckpt.close()

  # The final figure: the whole split, or train.final_eval_batches (optional) where a
  # study with a large held-out split runs many models.
  eval_metrics = run_eval(step, max_batches=tc.get('final_eval_batches', 0))
  samples = []
  prompts = sample_prompts[:tc['num_samples']]
  if prompts and config['objective']['name'] != 'masked':
    samples = sampling.greedy_texts(state.params, model_cfg, tokenizer, prompts,
                                    tc['sample_tokens'])
    writer.write(step, {f'sample_{i}': p + s for i, (p, s) in
                        enumerate(zip(prompts, samples))}, prefix='samples/')
  writer.close()
  summary = dict(step=step, final_train_loss=losses[-1][1] if losses else None,
                 validation=eval_metrics,
                 unigram_entropy=unigram_entropy(setup.train_rows, tokenizer.vocab_size),
                 params=counts, flops_per_token=flops_per_token,
                 samples=[p + s for p, s in zip(prompts, samples)],
                 interrupted=step < tc['steps'], stopped_by_signal=stop.requested)
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / 'summary.json', summary)
  return summary, state.params


def main(config, workdir):
  common.maybe_initialize_distributed()
  summary = train(config, workdir)
  common.log('\nfinal validation: ' + json.dumps(summary['validation']))
  common.log(f'unigram entropy of the corpus: {summary["unigram_entropy"]:.3f} nats/token')
  for s in summary['samples']:
    common.log(f'sample: {s!r}')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/pretrain.py:tiny', 'runs/pretrain')
