"""What every experiment does at its edges: flags, clean errors, mesh, logging, progress.

Kept small on purpose; the science lives in `research/`.
"""
import ast
import difflib
import functools
import importlib.util
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Optional

import jax
import numpy as np
from absl import app, flags, logging

from research import sharding


class UserError(Exception):
  """A problem with the user's input: printed as one line, no traceback."""


def _load_config_file(spec: str):
  path, _, arg = spec.partition(':')
  file = pathlib.Path(path)
  if not file.is_file():
    raise UserError(f'--config={spec}: no such config file {path}')
  module_spec = importlib.util.spec_from_file_location(f'_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'--config={spec}: {e}') from None


def _parse_value(text: str, current, name: str):
  """The override's value, as the type of the field it replaces."""
  if isinstance(current, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
  elif isinstance(current, (int, float)):
    try:
      return type(current)(text) if isinstance(current, float) else int(text)
    except ValueError:
      pass
  elif isinstance(current, str) or current is None:
    return text
  elif isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
      if isinstance(value, (tuple, list)):
        return type(current)(value)
    except (ValueError, SyntaxError):
      pass
  raise UserError(f'--config.{name}={text}: expected a {type(current).__name__}')


def apply_override(config, name: str, text: str) -> None:
  """Sets config.<name> = text (typed like the field); a wrong key names the closest one."""
  node, path = config, ''
  keys = name.split('.')
  for i, key in enumerate(keys):
    if key not in node:
      close = difflib.get_close_matches(key, list(node.keys()), n=1)
      hint = f' (did you mean --config.{path}{close[0]}?)' if close else ''
      raise UserError(f'unknown config key --config.{path}{key}{hint}')
    if i == len(keys) - 1:
      current = node[key]
      if hasattr(current, 'keys'):
        raise UserError(f'--config.{name} is a section, not a value')
      setattr(node, key, _parse_value(text, current, name))
    else:
      node, path = node[key], f'{path}{key}.'


def parse_config_args(argv, default_spec: str):
  """Splits `--config=FILE:ARG`, `--config.a.b=VALUE` and `--init=WORKDIR` (short for
  `--config.init=WORKDIR`, for stages that start from another's output) off argv ->
  (config, other args)."""
  spec, sets, rest = default_spec, [], [argv[0]]
  for arg in argv[1:]:
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith('--init='):  # a later stage's starting workdir: config.init
      sets.append(('init', arg.split('=', 1)[1]))
    elif arg.startswith('--config.'):
      name, eq, value = arg[len('--config.'):].partition('=')
      if not eq:
        raise UserError(f'{arg}: expected --config.{name}=VALUE')
      sets.append((name, value))
    else:
      rest.append(arg)
  config = _load_config_file(spec)
  for name, value in sets:
    apply_override(config, name, value)
  return config, rest


def user_errors() -> tuple:
  """The exceptions that mean bad input rather than a bug: a config, corpus, checkpoint,
  mesh or argument the user gave (each carries a one-line message naming it)."""
  from research import checkpoint, data  # pylint: disable=g-import-not-at-top
  return (UserError, data.DataError, checkpoint.CheckpointError, sharding.MeshError)


def exit_on_user_error(fn, extra: tuple = ()):
  """`fn` wrapped so that a user error (`user_errors()` and `extra`) ends in `error:
  <message>` on stderr and exit status 2, never a traceback."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except user_errors() + tuple(extra) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  return wrapped


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag as one line and exit 2 (absl's own: exit 1
  and a second line)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run_main(main_fn, argv=None, extra_errors: tuple = ()) -> None:
  """The one error path of every entry point (stages, tools, benchmarks):
  `app.run(main_fn)`, where an unknown or malformed flag and a user error raised by
  `main_fn` end in one line `error: ...` on stderr and exit status 2."""
  app.run(exit_on_user_error(main_fn, extra_errors), argv=argv, flags_parser=_parse_flags)


def run_experiment(main_fn, default_config: str, default_workdir: str):
  """Runs main_fn(config, workdir) under absl (`--config=...`, `--config.a.b=...`,
  `--workdir=...`); bad configs, data, meshes or workdirs end in one line on stderr
  (exit 2), never a traceback."""
  workdir = flags.DEFINE_string('workdir', default_workdir, 'Run folder (resumed if present).')
  config, argv = exit_on_user_error(parse_config_args)(sys.argv, default_config)

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    check_workdir(workdir.value)
    validate_config(config)
    return main_fn(config, workdir.value)
  run_main(main, argv=argv)


def _launched(env) -> bool:
  return 'JAX_NUM_PROCESSES' in env and 'JAX_PROCESS_ID' in env  # experiments.launch


def distributed_env(env) -> bool:
  """Whether `env` describes a multi-host run: experiments.launch (local processes,
  gloo collectives), a coordinator address, a TPU pod slice, SLURM with several tasks."""
  return _launched(env) or any(k in env for k in ('JAX_COORDINATOR_ADDRESS',
                                                  'COORDINATOR_ADDRESS')) or (
      ',' in env.get('TPU_WORKER_HOSTNAMES', '')) or int(env.get('SLURM_NTASKS', '1')) > 1


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when `distributed_env(os.environ)`."""
  env = os.environ
  if _launched(env):
    if env.get('LAUNCH_CPU_COLLECTIVES'):
      jax.config.update('jax_cpu_collectives_implementation', env['LAUNCH_CPU_COLLECTIVES'])
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  elif distributed_env(env):
    jax.distributed.initialize()


def one_process_env(env) -> dict:
  """`env` without what makes `distributed_env` true: a command run with it is a
  one-process program. On a TPU slice the accelerator needs
  every host, so that program runs on the host's CPU (JAX_PLATFORMS=cpu)."""
  env = {k: v for k, v in env.items()
         if k not in ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                      'JAX_PROCESS_ID', 'LAUNCH_CPU_COLLECTIVES')}
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    env.pop('TPU_WORKER_HOSTNAMES')
    env['JAX_PLATFORMS'] = 'cpu'
  if 'SLURM_NTASKS' in env:
    env['SLURM_NTASKS'] = '1'
  return env


def barrier(name: str, timeout_hours: float = 24.0) -> None:
  """Every process waits here until all have arrived; nothing on one process.

  The distributed service's barrier, not a device collective: it holds while process 0
  writes files the others then read (the pipeline's moved folders, DPO's pairs), however
  long that takes, and it fails as soon as the service sees a process die. `name` must be
  new for each use in a run.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(name, int(timeout_hours * 3600e3))


def make_mesh(shape) -> jax.sharding.Mesh:
  """Mesh from config; one -1 entry takes all remaining devices."""
  shape = list(shape)
  if len(shape) != 3:
    raise sharding.MeshError(f'mesh shape {tuple(shape)}: expected three sizes (data, fsdp, tensor)')
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise sharding.MeshError(f'mesh shape {tuple(shape)}: at most one -1')
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = max(1, n // rest)
  size = int(np.prod(shape))
  if size > n:
    raise sharding.MeshError(f'mesh shape {tuple(shape)} needs {size} devices, {n} are available')
  if jax.process_count() > 1 and size != n:
    raise sharding.MeshError(f'mesh shape {tuple(shape)} has {size} devices: with '
                             f'{jax.process_count()} processes it must use all {n}')
  return sharding.make_mesh(shape, jax.devices()[:size])  # a smaller mesh uses the first devices


class MetricWriter:
  """Metrics to `metrics.jsonl` and TensorBoard; only process 0 writes."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    self.jsonl = None
    self.tb = None
    if self.active:
      workdir = pathlib.Path(workdir)
      self.jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self.tb = SummaryWriter(str(workdir / 'tensorboard'))
      except ImportError:
        self.tb = None

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.active:
      return
    row = {'step': int(step)}
    for k, v in (metrics or {}).items():
      name = f'{prefix}{k}'
      if v is None:  # a metric over zero items (e.g. no validation split): absent
        continue
      if isinstance(v, str):
        row[name] = v
        if self.tb:
          self.tb.add_text(name, v, step)
        continue
      v = float(v)
      row[name] = v
      if self.tb and math.isfinite(v):
        self.tb.add_scalar(name, v, step)
    if len(row) == 1:
      return
    self.jsonl.write(json.dumps(row) + '\n')
    self.jsonl.flush()

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


class Progress:
  """One terminal line per report: step, loss, tokens/s, ETA."""

  def __init__(self, total_steps: int, first_step: int = 0):
    self.total, self.first = total_steps, first_step
    self.start = time.time()
    self.tty = sys.stdout.isatty()

  def update(self, step: int, text: str, final: bool = False) -> None:
    if jax.process_index() != 0:
      return
    done = max(step - self.first, 1)
    eta = (time.time() - self.start) / done * (self.total - step)
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = '#' * filled + '.' * (width - filled)
    line = f'[{bar}] {step}/{self.total} {text} eta {eta:5.0f}s'
    if self.tty and not final:
      print('\r' + line, end='', flush=True)
    else:
      print(('\r' if self.tty else '') + line, flush=True)


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def device_peak_flops() -> Optional[float]:
  """Named bf16 peak of one accelerator (for MFU), None on CPU."""
  kind = jax.devices()[0].device_kind.lower()
  peaks = {'h100': 989e12, 'h200': 989e12, 'a100': 312e12, 'v5 lite': 197e12,
           'v5e': 197e12, 'v4': 275e12, 'v5p': 459e12, 'v6': 918e12}
  for name, peak in peaks.items():
    if name in kind:
      return peak
  return None


def check_new_dir(out, flag: str = '--out') -> pathlib.Path:
  """`out` as a path; UserError (naming `flag`) unless it is new or an empty directory."""
  if not out:
    raise UserError(f'{flag} is required (the directory to write)')
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f'{flag}={out} exists and is not an empty directory: choose a new '
                           'one')
  return out


def write_dir_atomic(out: pathlib.Path, files: dict) -> None:
  """Writes {name: bytes | callable(path)} into a sibling temp dir, then renames it to out."""
  tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  try:
    for name, content in files.items():
      if callable(content):
        content(tmp / name)
      else:
        (tmp / name).write_bytes(content)
    if out.exists():
      out.rmdir()  # empty (check_out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# Rules for config values by their key (the last part of the dotted name), checked for
# every experiment before anything is written. Floats must also be finite everywhere.
_AT_LEAST_ONE = {'batch_size', 'seq_len', 'steps', 'iterations', 'log_every',
                 'grad_accum_steps', 'keep_checkpoints', 'keep', 'max_new_tokens',
                 'eval_prompts', 'minibatches', 'epochs', 'group_size', 'num_train',
                 'pairs_per_prompt', 'vocab_size'}
_AT_LEAST_ZERO = {'checkpoint_every', 'eval_every', 'warmup_steps', 'max_minutes',
                  'eval_batches', 'final_eval_batches', 'num_samples', 'sample_tokens',
                  'num_threads', 'prefetch_buffer_size', 'z_loss', 'weight_decay',
                  'beta', 'min_gap', 'entropy_coef', 'value_coef'}
_POSITIVE = {'learning_rate', 'policy_lr', 'value_lr', 'grad_clip', 'temperature'}
_FRACTION_BELOW_ONE = {'validation_fraction', 'heldout_fraction'}  # [0, 1)
_FRACTION = {'final_lr_fraction', 'causal_fraction', 'lam', 'gamma'}  # [0, 1]
_RATE = {'mask_rate', 'noise_rate'}  # (0, 1)


def _leaves(node, prefix=''):
  for key, value in node.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      yield from _leaves(value, name + '.')
    else:
      yield name, key, value


def validate_config(config) -> None:
  """Checks every value of a stage's config (ConfigDict or dict): finite numbers, counts
  >= 1 or >= 0, positive rates, fractions in range, by key name (the tables above), and
  the model section through `TransformerConfig`. Raises UserError naming the key and
  what is allowed, before anything is written."""
  from research import model as model_lib  # pylint: disable=g-import-not-at-top
  config = config.to_dict() if hasattr(config, 'to_dict') else config
  for name, key, value in _leaves(config):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    bad = None
    if isinstance(value, float) and not math.isfinite(value):
      bad = 'a finite number'
    elif key in _AT_LEAST_ONE and (value < 1 or value != int(value)):
      bad = 'an integer >= 1'
    elif key in _AT_LEAST_ZERO and value < 0:
      bad = 'a number >= 0'
    elif key in _POSITIVE and value <= 0:
      bad = 'a number > 0'
    elif key in _FRACTION_BELOW_ONE and not 0 <= value < 1:
      bad = 'a fraction in [0, 1)'
    elif key in _FRACTION and not 0 <= value <= 1:
      bad = 'a fraction in [0, 1]'
    elif key in _RATE and not 0 < value < 1:
      bad = 'a rate in (0, 1)'
    if bad:
      raise UserError(f'--config.{name}={value}: expected {bad}')
  data, train = config.get('data', {}), config.get('train', {})
  if 'grad_accum_steps' in train and 'batch_size' in data and \
      data['batch_size'] % train['grad_accum_steps']:
    raise UserError(f'--config.train.grad_accum_steps={train["grad_accum_steps"]} must divide '
                    f'--config.data.batch_size={data["batch_size"]}')
  if 'model' in config:
    try:
      model_lib.TransformerConfig.from_dict(config['model'])
    except (ValueError, TypeError) as e:
      raise UserError(f'model config: {e}') from None


def check_workdir(workdir) -> None:
  """A workdir is a folder or does not exist yet, and a folder holding checkpoints also
  holds the config.json written before them (UserError otherwise: resuming checkpoints
  whose config is gone could continue a different run, e.g. one a killed process saved
  after its folder was deleted)."""
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f'--workdir={workdir} is a file, not a folder')
  if (path / 'checkpoints').is_dir() and not (path / 'config.json').exists():
    raise UserError(f'--workdir={workdir} holds checkpoints/ but no config.json, so they '
                    'cannot be checked against this run: use a new --workdir')


def report_cli(argv, module: str, write) -> int:
  """The command line of every `*_report` module: `python -m experiments.<module>
  --workdir=RUN` calls `write(workdir)` and prints what it returns; a wrong argument or a
  run without the files the report reads is one line on stderr and exit status 2."""
  workdirs = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--workdir=')]
  if len(workdirs) != 1 or len(argv) != 2 or not pathlib.Path(workdirs[0]).is_dir():
    print(f'usage: python -m experiments.{module} --workdir=RUN (an existing run folder)',
          file=sys.stderr)
    return 2
  try:
    print(write(workdirs[0]))
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0
