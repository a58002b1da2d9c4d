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

A checkpoint that is there but cannot be read (a file under `state/` truncated, its
metadata missing) is damaged: every reader (`Checkpointer.restore_latest` for a resume,
`load_stage`, `load_meta`) falls back to the newest step that restores, with one warning
line naming the damaged step and the step used, and raises a one-line CheckpointError when
none does. A resume moves the damaged steps to `checkpoints_damaged/` (nothing is deleted)
so that the run saves those steps again; a later stage reading a finished run leaves its
folder as it is.
"""
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Callable, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from research import model as model_lib
from research import tokenizer as tokenizer_lib

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
DAMAGED_DIR = 'checkpoints_damaged'  # where a resume moves the steps it could not read


class CheckpointError(ValueError):
  pass


def warn_stderr(msg: str) -> None:
  """The default `warn` of the readers below: one line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(f'warning: {msg}', file=sys.stderr, flush=True)


def failure_reason(error: BaseException, limit: int = 160) -> str:
  """Why a read failed, in one short line: the first line of the innermost exception of
  the chain as Python would print it (Orbax and TensorStore wrap the useful message
  several layers deep), prefixed by its type unless it is a CheckpointError."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ if error.__cause__ is not None else (
        None if error.__suppress_context__ else error.__context__)
    if inner is None:
      break
    error = inner
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  if not isinstance(error, CheckpointError):
    text = f'{type(error).__name__}: {text}'.strip()
  return text if len(text) <= limit else text[:limit - 3] + '...'


def metadata_of_state(step_folder: pathlib.Path) -> dict:
  """The parsed `state/_METADATA` of a checkpoint folder ({} when absent)."""
  path = step_folder / 'state' / '_METADATA'
  return json.loads(path.read_text()) if path.is_file() else {}


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

  def first_readable(self, read_fn: Callable[[int], Any], *, move_damaged: bool = False,
                     warn: Callable[[str], None] = warn_stderr) -> Optional[tuple[int, Any]]:
    """(step, read_fn(step)) of the newest step whose read succeeds; None when there is
    no finished step at all.

    Steps whose read raises are damaged: when an older step reads, one `warn` line names
    them, their reasons and the step used; with `move_damaged` (a resume: the run will
    save those steps again) they are moved to `<workdir>/checkpoints_damaged/` first, never
    deleted. Raises CheckpointError (one line, every step and its reason) when no step
    reads. Across processes a step counts as read only if every process read it.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        result, reason = read_fn(step), None
      except Exception as e:  # pylint: disable=broad-except  # any failure to read is damage
        result, reason = None, failure_reason(e)
      if jax.process_count() > 1:  # all processes must agree on the step they resume from
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        if not multihost_utils.process_allgather(jnp.int32(reason is None)).all():
          reason = reason or 'unreadable on another process'
      if reason is None:
        break
      damaged.append((step, reason))
    else:
      if not damaged:
        return None
      raise CheckpointError(f'{self.directory}: no readable checkpoint (' + '; '.join(
          f'step {s}: {r}' for s, r in damaged) + '); its files are left as they are')
    if damaged:
      where = ''
      if move_damaged:
        where = f' (the damaged steps moved to {self.move_aside([s for s, _ in damaged])}/)'
      warn(f'{self.directory}: ' + '; '.join(f'step {s} is damaged ({r})' for s, r in damaged)
           + f'; using step {step}, the newest readable one{where}')
    return step, result

  # The metadata file of each item, as orbax-checkpoint 0.12 writes them.
  _ITEM_METADATA = {'state': '_METADATA', 'meta': 'metadata'}

  def verify(self, step: int, chunks_at_once: int = 32) -> None:
    """Raises CheckpointError naming what is wrong with checkpoint `step` on disk: an
    item folder or its metadata file missing or unparsable, an array chunk that cannot
    be read in full or empty (a data file truncated or gone). Reads every stored chunk once,
    synchronously, before Orbax restores: Orbax's own failure on such a file is a
    traceback dozens of lines deep, and its abandoned parallel reads go on printing
    `Event loop is closed` after the error has been caught."""
    import tensorstore as ts  # pylint: disable=g-import-not-at-top  # Orbax's array store
    folder = self.directory / str(step)
    for item, name in self._ITEM_METADATA.items():
      path = folder / item / name
      if not path.is_file():
        raise CheckpointError(f'{item}/{name} is missing')
      try:
        json.loads(path.read_text())
      except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{item}/{name} is not valid JSON ({e})') from None
    if not metadata_of_state(folder).get('use_ocdbt', False):
      return
    try:
      store = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{folder / "state"}/'}).result()
      keys = store.list().result()
    except Exception as e:  # pylint: disable=broad-except  # tensorstore raises ValueError...
      raise CheckpointError(f'state/ cannot be opened ({failure_reason(e)})') from None
    for i in range(0, len(keys), chunks_at_once):
      batch = keys[i:i + chunks_at_once]
      for key, read in zip(batch, [store.read(k) for k in batch]):
        try:
          value = read.result()
        except Exception as e:  # pylint: disable=broad-except
          raise CheckpointError(f'state/{key.decode()} cannot be read '
                                f'({failure_reason(e)})') from None
        # No zarr chunk or .zarray is empty; a data file that is gone reads as b''.
        if value.state != 'value' or not len(value.value):
          raise CheckpointError(f'state/{key.decode()} is missing or empty (a data file '
                                'under state/ is gone?)')

  def move_aside(self, steps) -> pathlib.Path:
    """Moves the folders of `steps` to `<workdir>/checkpoints_damaged/` (a suffix `.1`,
    `.2`, ... where a name is taken) and makes the manager forget them; -> that folder."""
    target = self.directory.parent / DAMAGED_DIR
    if jax.process_index() == 0:
      target.mkdir(exist_ok=True)
      for step in steps:
        dest, n = target / str(step), 0
        while dest.exists():
          n += 1
          dest = target / f'{step}.{n}'
        shutil.move(str(self.directory / str(step)), str(dest))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('checkpoint.move_aside')
    self.manager.reload()
    return target

  def restore_latest(self, abstract_state, data_iterator=None, data_state_key: str = '',
                     warn: Callable[[str], None] = warn_stderr
                     ) -> Optional[tuple[int, Any, dict]]:
    """A resume: (step, state, meta) of the newest readable checkpoint, damaged newer
    ones moved aside (see `first_readable`); None when there is none. The data iterator
    is restored in place, from `meta[data_state_key]` when the meta has it, else from the
    checkpoint's `data` item (checkpoints written before iterator states moved into the
    meta)."""
    def read(step):
      self.verify(step)
      state, meta = self.restore(step, abstract_state)
      if data_iterator is not None:
        if data_state_key and data_state_key in meta:
          data_iterator.set_state(meta[data_state_key])
        else:
          state, meta = self.restore(step, abstract_state, data_iterator)
      return state, meta

    found = self.first_readable(read, move_damaged=True, warn=warn)
    return None if found is None else (found[0], *found[1])

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


def load_stage(workdir, params_shardings_fn=None,
               warn: Callable[[str], None] = warn_stderr) -> tuple[Any, dict,
                                                                  tokenizer_lib.Tokenizer]:
  """Handoff to a later stage: (params, config dict, tokenizer) of a finished run.

  `params_shardings_fn(abstract_params) -> shardings` places the params on a mesh;
  default: all on this process's first device (every process its own whole copy).
  A damaged newest checkpoint falls back to the newest
  readable one with one `warn` line (the folder is left as it is); raises CheckpointError
  for a folder that is not a run, holds no checkpoint, or none that reads.
  """
  params, config, tokenizer, _ = load_stage_and_meta(workdir, params_shardings_fn, warn)
  return params, config, tokenizer


def load_stage_and_meta(workdir, params_shardings_fn=None,
                        warn: Callable[[str], None] = warn_stderr):
  """`load_stage` plus the meta JSON of the checkpoint the params came from:
  (params, config, tokenizer, meta)."""
  workdir = pathlib.Path(workdir)
  config = load_config(workdir)
  if config is None:
    raise CheckpointError(f'{workdir}: no {CONFIG_FILE}; is this a run folder?')
  tokenizer = load_tokenizer(workdir)
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
  abstract = abstract_like(shardings, shapes)
  ckpt = Checkpointer(workdir, async_save=False)

  def read(step):
    ckpt.verify(step)
    return ckpt.restore_params(step, abstract), _read_meta(ckpt, step)
  try:
    found = ckpt.first_readable(read, warn=warn)
  finally:
    ckpt.close()
  if found is None:
    raise CheckpointError(f'{workdir}: no finished checkpoint')
  params, meta = found[1]
  check_tokenizer(meta, tokenizer, workdir)
  return params, config, tokenizer, meta


def _read_meta(ckpt: Checkpointer, step: int) -> dict:
  return ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def load_meta(workdir, step: Optional[int] = None,
              warn: Callable[[str], None] = warn_stderr) -> dict:
  """The meta JSON of checkpoint `step` of a workdir (default: the newest whose meta
  reads, a damaged newer one named in one `warn` line). Raises CheckpointError when there
  is no finished checkpoint or none whose meta reads."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    if step is not None:
      return _read_meta(ckpt, step)
    found = ckpt.first_readable(lambda s: _read_meta(ckpt, s), warn=warn)
    if found is None:
      raise CheckpointError(f'{workdir}: no finished checkpoint')
    return found[1]
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
  params, config, tokenizer, meta = load_stage_and_meta(workdir)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  if not cfg.scalar_head:
    raise CheckpointError(f'{workdir}: not a reward model (model.scalar_head is false)')
  offset = meta.get('offset')
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
