"""Orbax checkpoints and the stage handoff: the one place that touches model files.

A run's workdir holds
  config.json         the resolved config of the run (written once, before training)
  tokenizer.model     the tokenizer every stage after this one must use
  checkpoints/N/      train state (sharded arrays), data-iterator state, meta (JSON:
                      step, seed, tokenizer fingerprint, metrics at save time)
Saves are asynchronous; a kill during one leaves `N.orbax-checkpoint-tmp`, which the
manager ignores, so a restart resumes from the last complete step. Arrays restore
into whatever shardings the caller asks for, so a checkpoint saved on one mesh loads
onto another.
"""
import json
import os
import pathlib
from typing import Any, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from research import model as model_lib
from research import tokenizer as tokenizer_lib

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'


class CheckpointError(ValueError):
  pass


def write_json_atomic(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  os.replace(tmp, path)


def abstract_like(shardings, shapes):
  """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
  return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shardings, shapes)


class Checkpointer:
  """Async Orbax saves of (train state, data iterator, meta) every k steps, keeping n."""

  def __init__(self, workdir, keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=('state', 'data', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, meta: dict) -> bool:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """-> (state, meta); restores the data iterator in place when given."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored['meta']

  def restore_params(self, step: int, abstract_params):
    """Only the params subtree (for later stages), into the given shardings."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={'params': abstract_params},
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                      {'params': abstract_params}),
            partial_restore=True)))
    return restored['state']['params']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_config(workdir) -> Optional[dict]:
  path = pathlib.Path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def load_tokenizer(workdir) -> tokenizer_lib.Tokenizer:
  path = pathlib.Path(workdir) / TOKENIZER_FILE
  if not path.exists():
    raise CheckpointError(f'{path}: no tokenizer in this workdir')
  return tokenizer_lib.Tokenizer.load(path)


def check_same_model(saved: dict, config: dict, workdir, keys=('model', 'tokenizer'),
                     ignore=()) -> None:
  """A workdir only resumes the run it holds: a difference in any of `keys` (sections or
  top-level values; dotted names in `ignore` are allowed to change) is a one-line
  CheckpointError naming the key and both values."""
  for section in keys:
    old, new = saved.get(section, {}), config.get(section, {})
    if not isinstance(old, dict) or not isinstance(new, dict):
      old, new, names = {section: old}, {section: new}, lambda k: k
    else:
      names = lambda k, s=section: f'{s}.{k}'
    for key in sorted(set(old) | set(new)):
      if names(key) in ignore or old.get(key) == new.get(key):
        continue
      what = 'model' if section in ('model', 'tokenizer', 'objective', 'data') else 'run'
      raise CheckpointError(
          f'workdir {workdir} holds a different {what} ({names(key)} is {old.get(key)!r} '
          f'there, {new.get(key)!r} here): use a new --workdir')


# What a resume may change: how data is read, the step budget (and so the schedule's
# length), where a tokenizer file was found.
RESUMABLE_CHANGES = ('data.num_threads', 'data.prefetch_buffer_size', 'optimizer.total_steps',
                     'tokenizer.path',
                     # prepared shards check their own identity on resume (a changed
                     # mixture is refused there unless data.allow_data_change)
                     'data.shards', 'data.allow_data_change')


def check_tokenizer(meta: dict, tokenizer: tokenizer_lib.Tokenizer, where) -> None:
  if meta.get('tokenizer_fingerprint') not in (None, tokenizer.fingerprint):
    raise CheckpointError(f'{where}: checkpoint was trained with tokenizer '
                          f'{meta["tokenizer_fingerprint"]}, not {tokenizer.fingerprint}')


def load_stage(workdir, params_shardings_fn=None) -> tuple[Any, dict, tokenizer_lib.Tokenizer]:
  """Handoff to a later stage: (params, config dict, tokenizer) of a finished run.

  `params_shardings_fn(abstract_params) -> shardings` places the params on a mesh;
  default: all on this process's first device (every process its own whole copy).
  """
  workdir = pathlib.Path(workdir)
  config = load_config(workdir)
  if config is None:
    raise CheckpointError(f'{workdir}: no {CONFIG_FILE}; is this a run folder?')
  tokenizer = load_tokenizer(workdir)
  ckpt = Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f'{workdir}: no finished checkpoint')
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  if cfg.vocab_size != tokenizer.vocab_size:
    raise CheckpointError(f'{workdir}: model vocab {cfg.vocab_size} != tokenizer vocab '
                          f'{tokenizer.vocab_size}')
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                                   jnp.zeros((1, 8), bool))['params'])
  if params_shardings_fn is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    shardings = params_shardings_fn(shapes)
  params = ckpt.restore_params(step, abstract_like(shardings, shapes))
  meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  check_tokenizer(meta, tokenizer, workdir)
  ckpt.close()
  return params, config, tokenizer


def load_meta(workdir, step: Optional[int] = None) -> dict:
  """The meta JSON of checkpoint `step` (default: the latest) of a workdir."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{workdir}: no finished checkpoint')
    return ckpt.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
  finally:
    ckpt.close()


def load_reward_model(workdir) -> tuple[Any, model_lib.TransformerConfig, tokenizer_lib.Tokenizer,
                                        float]:
  """(params, cfg with scalar_head=True, tokenizer, score offset) of a trained reward model.

  Subtract the offset from scores (`reward_model.normalized`) to centre them on the
  training pairs. Raises CheckpointError for a workdir that is not a finished reward
  model (no scalar head, or no offset: its training did not finish).
  """
  workdir = pathlib.Path(workdir)
  params, config, tokenizer = load_stage(workdir)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  if not cfg.scalar_head:
    raise CheckpointError(f'{workdir}: not a reward model (model.scalar_head is false)')
  offset = load_meta(workdir).get('offset')
  if offset is None:
    raise CheckpointError(f'{workdir}: its last checkpoint has no score offset (training did '
                          'not finish: run it again to resume)')
  return params, cfg, tokenizer, float(offset)


def save_params_stage(out, config: dict, tokenizer: tokenizer_lib.Tokenizer, params, step: int,
                      **meta) -> pathlib.Path:
  """Writes a params-only stage that `load_stage` reads: out/config.json, tokenizer.model
  and a checkpoint of {'params': params} at `step` (kept if it exists). For stages whose
  training state is not a TrainState (RL policies, imported models)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:  # the params below: collectively, by every process
    write_json_atomic(out / CONFIG_FILE, config)
    tokenizer.save(out / TOKENIZER_FILE)
  ckpt = Checkpointer(out, keep=1, async_save=False)
  try:
    if ckpt.latest_step() != step:
      ckpt.save(step, {'params': params}, None,
                dict(meta, step=step, tokenizer_fingerprint=tokenizer.fingerprint))
      ckpt.wait()
  finally:
    ckpt.close()
  return out


def pretraining_split(init_workdir, default_fraction: float) -> tuple[Optional[str], float, int]:
  """(corpus, validation fraction, split seed) of the pretraining run behind an init.

  Follows the `init` links of SFT-like configs to the first config with `data.corpus`;
  (None, default_fraction, 0) when there is none.
  """
  workdir = pathlib.Path(init_workdir)
  for _ in range(8):
    config = load_config(workdir)
    if config is None:
      break
    dc = config.get('data', {})
    if 'corpus' in dc:
      return dc['corpus'], dc.get('validation_fraction', default_fraction), \
          dc.get('split_seed', config.get('seed', 0))
    if not config.get('init'):
      break
    workdir = pathlib.Path(config['init'])
  return None, default_fraction, 0
