"""The one training loop every stage runs on: pretraining, SFT, reward model and RL.

    loop = Loop(workdir, steps=1000, checkpoint_every=100, max_minutes=10)
    restored = loop.restore(abstract_state, data_iterator)       # None on a fresh run
    state = restored.state if restored else initial_state
    loop.add_hook(evaluate, every=200)                            # (step, state) -> metrics
    result = loop.run(state, step_fn, batches, meta_fn=lambda step: {...})

A step is `step_fn(state, batch) -> (state, metrics)`: a jitted train step, a PPO
iteration, anything that advances a pytree state by one batch. The loop owns what
every stage needs around it, once:

  - hooks every n steps (evaluate, sample, ...), their metrics logged under `eval/`;
  - checkpoints every n steps and at the end (Orbax, async), with the data iterator's
    state (anything with get_state/set_state returning JSON: a grain iterator, an
    EpochSampler) in the checkpoint's meta (restores onto any number of processes);
  - exact resume: the state, the data iterator and `metrics.jsonl` truncated to the
    restored step, so the file never holds a step twice;
  - a wall-clock budget (`max_minutes`), SIGTERM / Ctrl-C save-and-exit at the next
    step boundary (a second Ctrl-C gives up at once);
  - `metrics.jsonl` and TensorBoard (process 0 only), a progress line with ETA.

Levanter's `Trainer.add_hook(fn, every=n)` and nanodo's `train.py` are the anchors.
Two seams for resume tests, both acting after a step's metrics and hooks and before
its checkpoint: `simulate_kill(n)` (in process) makes `run` raise `SimulatedKill` after
n steps of a call; the environment variable LOOP_KILL_AT_STEP=s makes the process
SIGKILL itself at step s, a real `kill -9` at a fixed step (`s@p`: only process p).
"""
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import grain
import jax
from experiments import common
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import evaluation
from research import flops as flops_lib
from research import model as model_lib
from research import objectives as objectives_lib
from research import sampling
from research import sharding as sharding_lib
from research import shards as shards_lib
from research import train_step as train_lib

METRICS_FILE = 'metrics.jsonl'
_DATA_STATE = 'data_state'  # meta key of the data iterator's state


class SimulatedKill(RuntimeError):
  """Raised by `Loop.run` under `simulate_kill`: the run stops as a kill -9 would."""


_kill: Optional[dict] = None  # {'steps': n, 'skip': runs left to pass over}


@contextlib.contextmanager
def simulate_kill(steps: int, skip_runs: int = 0):
  """Within the block, the (skip_runs + 1)-th call of `Loop.run` raises SimulatedKill
  after `steps` steps of that call (after their metrics and hooks, before the checkpoint
  of the last one); `skip_runs` lets a multi-stage run be killed in a later stage."""
  global _kill
  _kill = dict(steps=steps, skip=skip_runs)
  try:
    yield
  finally:
    _kill = None


class StopSignal:
  """SIGTERM / Ctrl-C set `requested`; the loop saves and exits at the next step boundary."""

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


def truncate_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops the rows of `metrics.jsonl` after `step`: they were written after the
  checkpoint a run resumes from, and will be written again."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists() or jax.process_index() != 0:
    return
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line)['step'] <= step]
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(line + '\n' for line in kept))
  tmp.replace(path)


def read_metrics(workdir) -> list[dict]:
  """The rows of a run's `metrics.jsonl` (empty when there is none)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Restored:
  state: Any
  meta: dict
  step: int


@dataclasses.dataclass
class Result:
  """What `Loop.run` returns.

  state: the final state. step: the last step taken. interrupted: stopped before
  `steps` (time budget or signal). stopped_by_signal: by SIGTERM / Ctrl-C.
  resumed_from: the checkpoint step this call restored, or None. steps_run: steps
  taken by this call. last_train: the last logged train metrics (floats).
  seconds: wall time of the steps of this call.
  """
  state: Any
  step: int
  interrupted: bool
  stopped_by_signal: bool
  resumed_from: Optional[int]
  steps_run: int
  last_train: dict
  seconds: float

  def record(self) -> dict:
    """The JSON-able part, for a stage's summary."""
    return dict(step=self.step, interrupted=self.interrupted,
                stopped_by_signal=self.stopped_by_signal, resumed_from=self.resumed_from,
                steps_run=self.steps_run, seconds=self.seconds)


@dataclasses.dataclass
class _Hook:
  fn: Callable[[int, Any], Optional[dict]]
  every: int
  prefix: str
  at_end: bool


class Loop:
  """Runs a step function over batches with hooks, checkpoints, a budget and resume.

  Args:
    workdir: the run folder (checkpoints/, metrics.jsonl, tensorboard/).
    steps: the step to stop at (a resumed run continues up to it).
    checkpoint_every: steps between checkpoints (0: only at the end).
    keep: checkpoints kept.
    max_minutes: wall-clock budget of this call (0: none); when it runs out the loop
      saves and returns with `interrupted`.
    log_every: steps between train-metric rows (the first step of a call and the last
      step are always logged).
    units_per_step: e.g. tokens per step, for `<units_name>_per_second` in the logs.
    flops_per_step: training FLOPs of one step, for `achieved_flops` (and `mfu` on an
      accelerator whose peak `common.device_peak_flops` knows).
    progress_fn: train metrics (floats) -> the text of the progress line.
    save_final: save a checkpoint when the last step is reached (a stage that saves its
      own final checkpoint after evaluating passes False).
  """

  def __init__(self, workdir, *, steps: int, checkpoint_every: int = 0, keep: int = 2,
               max_minutes: float = 0.0, log_every: int = 1, units_per_step: float = 0.0,
               units_name: str = 'tokens', flops_per_step: float = 0.0,
               progress_fn: Callable[[dict], str] = lambda m: f'loss {m.get("loss", 0):.3f}',
               save_final: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.steps, self.checkpoint_every, self.log_every = steps, checkpoint_every, log_every
    self.max_minutes, self.save_final = max_minutes, save_final
    self.units_per_step, self.units_name, self.progress_fn = units_per_step, units_name, progress_fn
    self.flops_per_step, self.peak_flops = flops_per_step, common.device_peak_flops()
    self.ckpt = checkpoint_lib.Checkpointer(self.workdir, keep=keep)
    self.hooks: list[_Hook] = []
    self.resumed_from: Optional[int] = None
    self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- setup -------------------------------------------------------------------------

  def add_hook(self, fn: Callable[[int, Any], Optional[dict]], every: int,
               prefix: str = 'eval/', at_end: bool = False) -> None:
    """Calls fn(step, state) after every `every`-th step (0: never; `at_end`: also after
    the last step); a returned dict of numbers is logged under `prefix`."""
    self.hooks.append(_Hook(fn, every, prefix, at_end))

  def restore(self, abstract_state, data_iterator=None) -> Optional[Restored]:
    """Restores the latest readable checkpoint (state into `abstract_state`'s shardings,
    the data iterator in place; a damaged newer one is moved aside with a warning, see
    `Checkpointer.restore_latest`) and truncates the metrics to its step; None (and the
    metrics of a run killed before its first checkpoint dropped) when there is none."""
    found = self.ckpt.restore_latest(abstract_state, data_iterator, _DATA_STATE)
    if found is None:
      truncate_metrics(self.workdir, 0)
      return None
    latest, state, meta = found
    truncate_metrics(self.workdir, latest)
    self.resumed_from = latest
    common.log(f'resumed from step {latest}')
    return Restored(state=state, meta=meta, step=latest)

  def save(self, step: int, state, data_iterator=None, meta: Optional[dict] = None) -> None:
    """A checkpoint of (state, data iterator, meta) at `step` (no-op if it exists)."""
    if self.ckpt.latest_step() == step:
      return
    meta = dict(meta or {}, step=step)
    if data_iterator is not None:
      # The iterator's position, as JSON in the meta: every process is at the same one
      # (they step together), so it restores onto any number of processes.
      meta[_DATA_STATE] = data_iterator.get_state()
    self.ckpt.save(step, state, None, meta)

  def log(self, step: int, metrics: dict, prefix: str = 'eval/') -> None:
    """One row of metrics.jsonl (and TensorBoard) at `step`, names prefixed."""
    if self._writer is None:  # opened after `restore` has truncated the file
      self._writer = common.MetricWriter(self.workdir)
    self._writer.write(step, metrics, prefix=prefix)

  # -- the loop ----------------------------------------------------------------------

  def run(self, state, step_fn: Callable[[Any, Any], tuple[Any, dict]], batches: Iterator, *,
          first_step: int, meta_fn: Callable[[int], dict] = lambda step: {},
          save_fn: Callable[[Any], Any] = lambda state: state) -> Result:
    """Steps from `first_step` to `steps`; returns a Result (the state is not closed).

    `batches` yields one batch per step (its state is checkpointed when it has
    get_state/set_state); `meta_fn(step)` adds a stage's JSON to each checkpoint's meta;
    `save_fn(state)` is the tree that is saved (e.g. a dataclass turned into a dict).
    """
    kill_after = None
    if _kill is not None:
      kill_after = _kill['steps'] if _kill['skip'] == 0 else None
      _kill['skip'] -= 1
    stop = StopSignal()
    progress = common.Progress(self.steps, first_step)
    deadline = time.time() + 60 * self.max_minutes if self.max_minutes > 0 else None
    step, last_train, steps_since = first_step, {}, 0
    t_start = t_last = time.time()

    def checkpoint(step):
      self.save(step, save_fn(state), batches, meta_fn(step))

    try:
      while step < self.steps:
        state, metrics = step_fn(state, next(batches))
        step += 1
        steps_since += 1
        if step % self.log_every == 0 or step == self.steps or step == first_step + 1:
          metrics = {k: v if isinstance(v, str) else float(v)
                     for k, v in jax.device_get(metrics).items()}
          now = time.time()
          metrics['steps_per_second'] = steps_since / max(now - t_last, 1e-9)
          if self.units_per_step:
            metrics[f'{self.units_name}_per_second'] = (
                self.units_per_step * metrics['steps_per_second'])
          if self.flops_per_step:
            metrics['achieved_flops'] = self.flops_per_step * metrics['steps_per_second']
            if self.peak_flops:  # accelerators with a known peak only
              metrics['mfu'] = metrics['achieved_flops'] / (self.peak_flops * jax.device_count())
          last_train = metrics
          self.log(step, metrics, prefix='train/')
          progress.update(step, self.progress_fn(metrics))
          t_last, steps_since = now, 0
        for hook in self.hooks:
          if (hook.every and step % hook.every == 0) or (hook.at_end and step == self.steps):
            out = hook.fn(step, state)
            if out:
              self.log(step, out, prefix=hook.prefix)
        if kill_after is not None and step - first_step >= kill_after:
          raise SimulatedKill(f'simulated kill after step {step}')
        if os.environ.get('LOOP_KILL_AT_STEP') in (str(step), f'{step}@{jax.process_index()}'):
          os.kill(os.getpid(), signal.SIGKILL)
        if self.checkpoint_every and step % self.checkpoint_every == 0 and (
            step < self.steps or self.save_final):
          checkpoint(step)
        if stop.requested or (deadline and time.time() > deadline):
          break
      interrupted = step < self.steps
      if interrupted or self.save_final:
        checkpoint(step)
      self.ckpt.wait()
    finally:
      stop.restore()
    return Result(state=state, step=step, interrupted=interrupted,
                  stopped_by_signal=stop.requested, resumed_from=self.resumed_from,
                  steps_run=step - first_step, last_train=last_train,
                  seconds=time.time() - t_start)

  def close(self) -> None:
    """Waits for pending saves, releases the checkpoint manager, closes the metrics."""
    self.ckpt.close()
    if self._writer is not None:
      self._writer.close()
      self._writer = None


# --------------------------------------------------------------------------------------
# The language-model stages (pretraining, SFT): packed rows, an objective, the loop.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LMSetup:
  """Everything a language-model stage builds from its config before the first step."""
  config: dict
  model_cfg: Any
  tokenizer: Any
  train_rows: Any  # PackedCorpus, or shards.ShardedRows / shards.Mixture (data.shards)
  validation_rows: Any
  data_identity: Optional[dict] = None  # shards and weights a resumed run must match


def train_language_model(setup: LMSetup, workdir, objective, mesh, *, fresh_config: bool,
                         init_params=None, sample_prompts=()) -> tuple[dict, Any]:
  """Trains (or resumes) a Transformer on `setup.train_rows` under `objective`.

  `objective(batch, rng, ids)` turns a batch of packed rows into inputs, targets and
  weights (research/objectives.py). A fresh run starts from `init_params` (a previous
  stage's) when given, else from `train_step.init_rng(seed)`; a workdir with a
  checkpoint resumes from it. Validation losses (objective and causal) every
  `train.eval_every` steps and at the end; greedy samples of `sample_prompts` at the
  end. Writes config.json (when `fresh_config`), tokenizer.model, checkpoints/,
  metrics.jsonl and summary.json. Returns (summary, final params).
  Raises common.UserError for a batch that grad_accum_steps does not divide.
  """
  config = setup.config
  tokenizer, model_cfg = setup.tokenizer, setup.model_cfg
  tc, dc = config['train'], config['data']
  workdir = pathlib.Path(workdir)
  model = model_lib.Transformer(model_cfg)
  tx, schedule = train_lib.make_optimizer(train_lib.OptimizerConfig(**config['optimizer']))
  shardings = train_lib.state_shardings(model, tx, mesh, dc['batch_size'], dc['seq_len'])
  if tc['grad_accum_steps'] < 1 or dc['batch_size'] % tc['grad_accum_steps']:
    raise common.UserError(f'train.grad_accum_steps={tc["grad_accum_steps"]} must divide '
                           f'data.batch_size={dc["batch_size"]}')
  ids = objectives_lib.SpecialIds.from_tokenizer(tokenizer)
  jitted = train_lib.jit_train_step(train_lib.make_train_step(
      model, tx, schedule, objective, ids, z_loss=tc['z_loss'],
      grad_accum_steps=tc['grad_accum_steps']), shardings, mesh, dc['batch_size'])
  eval_fn = evaluation.make_heldout_loss_fn(model, objective, ids, tc['z_loss'])

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
  rng = jax.random.key(config['seed'])
  counts = flops_lib.param_counts(model_cfg)
  flops_per_token = flops_lib.train_flops_per_token(model_cfg, dc['seq_len'], 'palm')
  tokens_per_step = dc['batch_size'] * dc['seq_len']

  def validation(step, state, max_batches=tc['eval_batches']):
    batches = (sharding_lib.global_batch(b, mesh)
               for b in data_lib.eval_batches(setup.validation_rows, batch_per_host))
    return evaluation.heldout_losses(eval_fn, state.params, batches, max_batches,
                                     seed=config['seed'])

  def progress(m):
    return f'loss {m["loss"]:.3f} acc {m["accuracy"]:.3f} {m["tokens_per_second"]:,.0f} tok/s'

  def step_fn(state, batch):
    return jitted(state, batch, rng)

  with Loop(workdir, steps=tc['steps'], checkpoint_every=tc['checkpoint_every'],
            keep=tc['keep_checkpoints'], max_minutes=tc['max_minutes'],
            log_every=tc['log_every'], units_per_step=tokens_per_step,
            flops_per_step=flops_per_token * tokens_per_step, progress_fn=progress) as loop:
    shapes = nn.unbox(train_lib.abstract_train_state(model, tx, 1, dc['seq_len'])[0])
    restored = loop.restore(checkpoint_lib.abstract_like(shardings, shapes), data_iter)
    if restored is not None:
      checkpoint_lib.check_tokenizer(restored.meta, tokenizer, workdir)
      shards_lib.check_same_data(restored.meta.get('data'), setup.data_identity,
                                 dc.get('allow_data_change', False), workdir)
      state = restored.state
    elif init_params is not None:
      state = train_lib.train_state_from_params(init_params, tx, shardings, mesh)
    else:
      state = train_lib.make_train_state(model, tx, mesh, train_lib.init_rng(config['seed']),
                                         dc['batch_size'], dc['seq_len'])
    common.log(f'model: {counts["total"] / 1e6:.2f}M params ({counts["non_embedding"] / 1e6:.2f}M '
               f'non-embedding), {flops_per_token / 1e6:.1f} MFLOP/token (palm: every matmul), '
               f'objective {config["objective"]["name"]}, mesh {dict(mesh.shape)}, '
               f'{setup.train_rows.num_tokens / 1e6:.2f}M train tokens')
    if not setup.validation_rows.num_rows:  # validation losses are then None (JSON null)
      common.log('no validation split (a validation_fraction of 0, or too few documents)')
    if hasattr(setup.train_rows, 'tokens_drawn'):  # a mixture: tokens taken from each source
      loop.add_hook(lambda step, state: setup.train_rows.tokens_drawn(
          step * dc['batch_size'], config['seed']), tc['log_every'], 'train/source_tokens/')
    if tc['eval_every']:
      loop.add_hook(lambda step, state: (validation(step, state) if step < tc['steps'] else
                                         None), every=tc['eval_every'])
    result = loop.run(state, step_fn, data_iter, first_step=int(state.step),
                      meta_fn=lambda step: dict(seed=config['seed'], config=config,
                                                tokenizer_fingerprint=tokenizer.fingerprint,
                                                data=setup.data_identity))
    state, step = result.state, result.step
    # The final figure: the whole split, or train.final_eval_batches (optional) where a
    # study with a large held-out split runs many models.
    eval_metrics = validation(step, state, max_batches=tc.get('final_eval_batches', 0))
    loop.log(step, eval_metrics)
    samples = []
    prompts = tuple(sample_prompts)[:tc['num_samples']]
    if prompts and objectives_lib.get(config['objective']['name']).can_generate:
      samples = sampling.greedy_texts(state.params, model_cfg, tokenizer, prompts,
                                      tc['sample_tokens'])
      loop.log(step, {f'sample_{i}': p + s for i, (p, s) in enumerate(zip(prompts, samples))},
               prefix='samples/')
  train = result.last_train
  summary = dict(step=step, final_train_loss=train.get('loss'), validation=eval_metrics,
                 unigram_entropy=shards_lib.unigram_entropy(setup.train_rows,
                                                            tokenizer.vocab_size),
                 params=counts, flops_per_token=flops_per_token,
                 samples=[p + s for p, s in zip(prompts, samples)],
                 interrupted=result.interrupted, stopped_by_signal=result.stopped_by_signal,
                 loop=result.record())
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / 'summary.json', summary)
  return summary, state.params
