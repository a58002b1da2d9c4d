"""Evaluate any stage's workdir(s) on lm-evaluation-harness tasks, offline.

  python -m experiments.evaluate --workdir=runs/pretrain --workdir=runs/sft \
      --tasks=piqa_local,openbookqa_local --limit=200 --out_dir=runs/eval

Each workdir (pretraining, SFT, DPO, PPO) is wrapped by `research.lm_eval_model` and run
through `lm_eval.simple_evaluate` on tasks from local YAML files (`evals/tasks` by
default, more with --include_path; the harness's own tasks with --include_defaults, which
download their data). Chat stages get our chat template (--chat=auto). Prints and writes,
under --out_dir:
  <run>.md / <run>.json   one table per workdir: task, metric, n, score, its 95 %
                          interval (Wilson for per-item 0/1 metrics, else ±1.96 stderr),
                          and the chance level (multiple choice: mean 1/#choices;
                          generation: the share of the most common gold answer)
  comparison.md / .json   every workdir side by side (pretrain vs SFT vs RL)
Bad input (a workdir that is not a finished run, an unknown task, a missing folder) is a
one-line error, exit 2, before anything is written.
"""
import collections
import difflib
import math
import os
import pathlib

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # nothing is downloaded at evaluation
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from absl import flags, logging  # pylint: disable=g-import-not-at-top

from experiments import common  # pylint: disable=g-import-not-at-top
from research import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from research import evaluation  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / 'evals' / 'tasks'

_WORKDIR = None
_TASKS = None
_LIMIT = None
_FEWSHOT = None
_BATCH = None
_CHAT = None
_INCLUDE = None
_DEFAULTS = None
_OUT = None
_SEED = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _WORKDIR, _TASKS, _LIMIT, _FEWSHOT, _BATCH, _CHAT, _INCLUDE, _DEFAULTS, _OUT, _SEED
  _WORKDIR = flags.DEFINE_multi_string('workdir', [], 'A finished run (repeat or comma-separate).')
  _TASKS = flags.DEFINE_list('tasks', ['piqa_local'], 'Task names or tags.')
  _LIMIT = flags.DEFINE_integer('limit', 0, 'Items per task (0: all).')
  _FEWSHOT = flags.DEFINE_integer('num_fewshot', -1, 'Few-shot examples (-1: the task default).')
  _BATCH = flags.DEFINE_integer('batch_size', 16, 'Rows per forward pass.')
  _CHAT = flags.DEFINE_enum('chat', 'auto', ['auto', 'yes', 'no'],
                            'Apply the chat template (auto: for stages with an init).')
  _INCLUDE = flags.DEFINE_multi_string('include_path', [], 'More folders of task YAML files.')
  _DEFAULTS = flags.DEFINE_bool('include_defaults', False,
                                "Also index lm_eval's built-in tasks (they need the network).")
  _OUT = flags.DEFINE_string('out_dir', 'runs/eval', 'Folder for the tables.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Few-shot sampling and generation seed.')


def check_workdir(workdir) -> pathlib.Path:
  """Raises CheckpointError unless `workdir` holds config.json, tokenizer.model and a
  finished checkpoint (cheap: nothing is loaded)."""
  workdir = pathlib.Path(workdir)
  if checkpoint_lib.load_config(workdir) is None:
    raise checkpoint_lib.CheckpointError(f'--workdir={workdir}: no config.json; not a run folder')
  if not (workdir / checkpoint_lib.TOKENIZER_FILE).exists():
    raise checkpoint_lib.CheckpointError(f'--workdir={workdir}: no tokenizer.model')
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise checkpoint_lib.CheckpointError(f'--workdir={workdir}: no finished checkpoint')
  finally:
    ckpt.close()
  return workdir


def task_manager(include_paths, include_defaults: bool, tasks):
  """A TaskManager over the YAML folders; raises UserError for a missing folder or a
  task name none of them defines (naming the closest)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  for p in include_paths:
    if not pathlib.Path(p).is_dir():
      raise common.UserError(f'--include_path={p}: no such folder')
  manager = TaskManager(include_path=[str(p) for p in include_paths],
                        include_defaults=include_defaults)
  known = set(manager.all_tasks)
  for t in tasks:
    if t not in known:
      close = difflib.get_close_matches(t, sorted(known), n=1)
      raise common.UserError(f'--tasks: unknown task {t!r}' +
                             (f' (did you mean {close[0]}?)' if close else ''))
  return manager


def _metric_values(samples, metric, filter_name):
  vals = [s[metric] for s in samples if s.get('filter', 'none') == filter_name and metric in s]
  return [float(v) for v in vals if isinstance(v, (int, float, bool))]


def chance_level(output_type: str, samples) -> float:
  """Multiple choice: mean of 1/#choices; generation: share of the most common target
  (always giving that answer); nan when unknown (log-likelihood tasks)."""
  if not samples:
    return float('nan')
  if output_type == 'multiple_choice':
    return float(sum(1 / len(s['arguments']) for s in samples) / len(samples))
  if output_type == 'generate_until':
    targets = collections.Counter(str(s.get('target')) for s in samples)
    return targets.most_common(1)[0][1] / sum(targets.values())
  return float('nan')


def score_rows(results: dict) -> list[dict]:
  """One row per (task, metric, filter) of a simple_evaluate result (with samples):
  task, metric, n, score, lo, hi, chance, interval ('wilson' | 'stderr' | 'none')."""
  rows = []
  for task, metrics in sorted(results['results'].items()):
    if task not in results.get('samples', {}):
      continue  # a group's aggregate
    samples = results['samples'][task]
    output_type = results['configs'][task].get('output_type', '')
    first_filter = [s for s in samples if s.get('filter', 'none') == samples[0].get('filter',
                                                                                     'none')]
    chance = chance_level(output_type, first_filter)
    for key, score in sorted(metrics.items()):
      if ',' not in key or '_stderr' in key or not isinstance(score, (int, float)):
        continue
      metric, filter_name = key.split(',', 1)
      vals = _metric_values(samples, metric, filter_name)
      n = len(vals) or len([s for s in samples if s.get('filter', 'none') == filter_name])
      if vals and all(v in (0.0, 1.0) for v in vals):
        lo, hi = evaluation.wilson_interval(int(sum(vals)), len(vals))
        kind = 'wilson'
      else:
        se = metrics.get(f'{metric}_stderr,{filter_name}')
        ok = isinstance(se, (int, float)) and math.isfinite(se)
        lo, hi = (score - 1.96 * se, score + 1.96 * se) if ok else (float('nan'),) * 2
        kind = 'stderr' if ok else 'none'
      rows.append(dict(task=task, metric=metric if filter_name == 'none' else key, n=n,
                       score=float(score), lo=lo, hi=hi, chance=chance, interval=kind))
  return rows


def _f(x) -> str:
  return '—' if x is None or (isinstance(x, float) and not math.isfinite(x)) else f'{x:.3f}'


def run_table(name: str, info: dict, rows: list[dict]) -> str:
  """A run's markdown table."""
  lines = [f'## {name}', '', f'workdir `{info["workdir"]}`, step {info["step"]}, chat template '
           f'{"on" if info["chat"] else "off"}, limit {info["limit"] or "all"}', '',
           '| task | metric | n | score | 95% interval | chance |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["task"]} | {r["metric"]} | {r["n"]} | {_f(r["score"])} | '
                 f'[{_f(r["lo"])}, {_f(r["hi"])}] | {_f(r["chance"])} |')
  return '\n'.join(lines) + '\n'


def comparison_table(runs: dict) -> str:
  """Runs side by side: one row per (task, metric), `score [lo, hi]` per run."""
  names = list(runs)
  keys = []
  for rows in runs.values():
    keys += [(r['task'], r['metric']) for r in rows if (r['task'], r['metric']) not in keys]
  lines = ['## comparison (95% intervals)', '',
           '| task | metric | chance | ' + ' | '.join(names) + ' |',
           '|---|---|---|' + '---|' * len(names)]
  for task, metric in keys:
    cells, chance = [], float('nan')
    for name in names:
      row = next((r for r in runs[name] if (r['task'], r['metric']) == (task, metric)), None)
      cells.append('—' if row is None else f'{_f(row["score"])} [{_f(row["lo"])}, {_f(row["hi"])}]')
      chance = row['chance'] if row is not None else chance
    lines.append(f'| {task} | {metric} | {_f(chance)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def evaluate_workdir(workdir, tasks, manager, *, limit=0, num_fewshot=-1, batch_size=16,
                     chat='auto', seed=0) -> tuple[dict, list[dict]]:
  """simple_evaluate of one workdir -> (info, score rows)."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  from research import lm_eval_model  # pylint: disable=g-import-not-at-top
  lm = lm_eval_model.ResearchLM(workdir=str(workdir), batch_size=batch_size, seed=seed,
                                chat={'auto': 'auto', 'yes': True, 'no': False}[chat])
  out = lm_eval.simple_evaluate(
      model=lm, tasks=list(tasks), task_manager=manager, limit=limit or None,
      num_fewshot=None if num_fewshot < 0 else num_fewshot, log_samples=True,
      apply_chat_template=lm.chat, random_seed=seed, numpy_random_seed=seed,
      torch_random_seed=seed, fewshot_random_seed=seed)
  info = dict(workdir=str(workdir), step=checkpoint_lib.load_meta(workdir).get('step'),
              chat=lm.chat, limit=limit, num_fewshot=num_fewshot, tasks=list(tasks))
  return info, score_rows(out)


def run_names(workdirs) -> list[str]:
  """Short unique names: the folder name, with its parent's when two share one."""
  names = [pathlib.Path(w).name for w in workdirs]
  return [f'{pathlib.Path(w).parent.name}_{n}' if names.count(n) > 1 else n
          for w, n in zip(workdirs, names)]


def main(argv):
  if len(argv) > 1:
    raise common.UserError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  workdirs = [w for arg in _WORKDIR.value for w in arg.split(',') if w]
  if not workdirs:
    raise common.UserError('--workdir is required (a finished run; repeat for several)')
  workdirs = [check_workdir(w) for w in workdirs]
  manager = task_manager([TASKS_DIR, *_INCLUDE.value], _DEFAULTS.value, _TASKS.value)
  runs, infos = {}, {}
  for name, workdir in zip(run_names(workdirs), workdirs):
    infos[name], runs[name] = evaluate_workdir(
        workdir, _TASKS.value, manager, limit=_LIMIT.value, num_fewshot=_FEWSHOT.value,
        batch_size=_BATCH.value, chat=_CHAT.value, seed=_SEED.value)
    print(run_table(name, infos[name], runs[name]), flush=True)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  for name in runs:
    (out / f'{name}.md').write_text(run_table(name, infos[name], runs[name]))
    checkpoint_lib.write_json_atomic(out / f'{name}.json', dict(info=infos[name], rows=runs[name]))
  comparison = comparison_table(runs)
  (out / 'comparison.md').write_text(comparison)
  checkpoint_lib.write_json_atomic(out / 'comparison.json', dict(info=infos, rows=runs))
  print(comparison)
  print(f'wrote {out}/')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
