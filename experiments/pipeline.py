"""The whole pipeline, raw text to a tool-using aligned chat model, in one command (the main job).

  python -m experiments.pipeline [--config=configs/pipeline.py:tiny] [--workdir=runs/pipeline]
  python -m experiments.pipeline --config.from_stage=sft      # rerun from SFT on
  python -m experiments.pipeline --config.rl_method=grpo      # grpo | rloo | dr_grpo | dpo

Stages, each in its own folder of the workdir and each starting from the previous
stage's checkpoint:

  pretrain   a sentencepiece tokenizer and the Transformer, causal LM on the embedded
             corpus (experiments.pretrain)
  sft        conversations with the loss on assistant tokens: everyday chat, synthetic
             word problems worked out in text and the same problems with every step
             handed to the calculator, GSM8K with calculator calls (experiments.sft)
  rlhf       by `rl_method`: a proxy reward model on gold-labelled pairs of the SFT
             policy's samples (rlhf/reward_model), then PPO (or GRPO, RLOO, Dr. GRPO)
             against it with a KL penalty, best-of-n and the over-optimisation curves
             (experiments.rlhf); or DPO on those pairs (experiments.dpo)
  evaluate   every model on the same held-out tests: word problems with the calculator
             and without, the lm-eval harness tasks, the limitation metrics
             (experiments.pipeline_eval)

A stage whose summary exists is skipped; a killed run restarts where it stopped (each
stage resumes from its own checkpoints) and, without time caps, ends with the same
numbers. `from_stage` moves that stage's folder and the later ones aside (to
`WORKDIR/previous/<stage>-<n>`, nothing is deleted) and reruns them. Each stage prints
a progress line with its ETA, and each stage's start the overall ETA. At the end the
report card, `report.md` and `report.json`, is rebuilt from the stages' files by
experiments.pipeline_report, and the last lines printed are the headline (word problems
with the calculator vs without), where the report is and the next commands to try.
"""
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from experiments import common
from experiments import dpo
from experiments import limitations
from experiments import pipeline_eval
from experiments import pipeline_report
from experiments import pretrain
from experiments import rlhf
from experiments import sft
from research import checkpoint as checkpoint_lib
from research import model as model_lib
from research import ppo
from research import preferences
from research import rl_tasks

STAGES = ('pretrain', 'sft', 'rlhf', 'evaluate')
TIMES_FILE = 'stage_times.json'  # wall seconds per stage, summed over restarts
CPU_FILE = 'stage_cpu_seconds.json'  # this process's CPU seconds (user + system, all threads)
SUMMARIES = {'pretrain': 'summary.json', 'sft': 'eval.json', 'rlhf': 'summary.json',
             'evaluate': pipeline_eval.SUMMARY_FILE}
PAIRS_FILE = 'pairs.npz'  # DPO: the gold-labelled pairs of the SFT policy's samples


def _done(workdir: pathlib.Path, stage: str) -> bool:
  """A stage is done when it left its final summary (a signal leaves none, or one that
  says so; a time cap counts as done)."""
  path = workdir / stage / SUMMARIES[stage]
  return path.exists() and not json.loads(path.read_text()).get('stopped_by_signal')


def _move_aside(workdir: pathlib.Path, from_stage: str) -> None:
  if from_stage not in STAGES:
    raise common.UserError(f'from_stage={from_stage!r}: expected one of {STAGES}')
  for stage in STAGES[STAGES.index(from_stage):]:
    folder = workdir / stage
    if folder.exists():
      n = 0
      while (workdir / 'previous' / f'{stage}-{n}').exists():
        n += 1
      (workdir / 'previous').mkdir(parents=True, exist_ok=True)
      folder.rename(workdir / 'previous' / f'{stage}-{n}')
      common.log(f'moved {folder} aside to {workdir / "previous" / f"{stage}-{n}"}')


def check_config(config) -> None:
  """UserError for a bad `rl_method`; sets the estimator of the PPO-family methods."""
  from configs import pipeline as pipeline_config  # pylint: disable=g-import-not-at-top
  method = config.rl_method
  if method not in pipeline_config.RL_METHODS:
    raise common.UserError(f'rl_method={method!r}: expected one of '
                           f'{pipeline_config.RL_METHODS}')
  if method in ('grpo', 'rloo', 'dr_grpo'):
    config.rlhf.ppo.advantage = method
    config.rlhf.ppo.group_size = max(config.rlhf.ppo.group_size, 4)
  elif method == 'ppo' and config.rlhf.ppo.advantage != 'gae':
    raise common.UserError(f'rl_method=ppo with rlhf.ppo.advantage='
                           f'{config.rlhf.ppo.advantage!r}: set rl_method instead')


def policy_dir(workdir) -> pathlib.Path:
  """The RL stage's policy: rlhf/policy (PPO and its estimators) or rlhf itself (DPO)."""
  workdir = pathlib.Path(workdir)
  policy = workdir / 'rlhf' / rlhf.POLICY_DIR
  return policy if policy.exists() else workdir / 'rlhf'


def _prompts(rc: dict, sft_dir, tokenizer) -> rl_tasks.Prompts:
  try:
    return rl_tasks.load_prompts(rc, sft_dir, tokenizer)
  except (rl_tasks.TaskError, preferences.PreferenceError) as e:
    raise common.UserError(str(e)) from None


def _rollouts(rc: dict, sft_dir):
  """(SFT params, tokenizer, prompts, rollout programs) for sampling the SFT policy."""
  params, init_config, tokenizer = checkpoint_lib.load_stage(sft_dir)
  policy_cfg = model_lib.TransformerConfig.from_dict(init_config['model'])
  prompts = _prompts(rc, sft_dir, tokenizer)
  programs = ppo.RolloutPrograms.make(policy_cfg, None, n=rc['ppo']['max_new_tokens'],
                                      stop_id=prompts.stop_id, pad_id=tokenizer.pad_id,
                                      close=rc['score_with_stop'], fast=rc['fast_compile'])
  return params, tokenizer, prompts, programs


def dpo_pairs(rc: dict, workdir: pathlib.Path, sft_dir) -> tuple[tuple[dict, dict], dict]:
  """The pairs the proxy reward model would train on (rl_tasks.policy_gold_pairs: 2k samples of the
  SFT policy per prompt, paired and labelled by gold), sampled once and kept in
  WORKDIR/pairs.npz so a resumed DPO run reads the same ones."""
  path = workdir / PAIRS_FILE
  if not path.exists():
    params, tokenizer, prompts, programs = _rollouts(rc, sft_dir)
    try:
      (train, held), stats = rl_tasks.policy_gold_pairs(programs, params, prompts, tokenizer,
                                                        rl_tasks.make_gold(rc['gold']), rc)
    except rl_tasks.TaskError as e:
      raise common.UserError(str(e)) from None
    workdir.mkdir(parents=True, exist_ok=True)
    arrays = {f'train/{k}': np.asarray(v) for k, v in train.items() if k != 'counts'}
    arrays.update({f'held/{k}': np.asarray(v) for k, v in held.items() if k != 'counts'})
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(workdir / 'pairs.json', stats)
      np.savez(path, **arrays)
    common.barrier('pipeline:dpo_pairs')  # the others read what process 0 wrote
  with np.load(path) as z:
    split = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
    pairs = (split('train/'), split('held/'))
  return pairs, json.loads((workdir / 'pairs.json').read_text())


def run_dpo(config, workdir: pathlib.Path, sft_dir) -> dict:
  """DPO from the SFT stage on the gold-labelled pairs, then the gold reward of the SFT
  and DPO policies' samples on the held-out prompts (as PPO's evaluation reports it)."""
  rc = json.loads(json.dumps(config.rlhf.to_dict()))
  pairs, stats = dpo_pairs(rc, workdir, sft_dir)
  summary = dpo.train(config.dpo, workdir, sft_dir, pairs=pairs)
  if summary['loop']['stopped_by_signal']:  # saved; finished when the run is resumed
    summary['stopped_by_signal'] = True
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(workdir / dpo.SUMMARY_FILE, summary)
    return dict(interrupted=True)
  sft_params, tokenizer, prompts, programs = _rollouts(rc, sft_dir)
  gold = rl_tasks.make_gold(rc['gold'])
  evals = {}
  for name, folder in (('start', sft_dir), ('end', workdir)):
    params = sft_params if name == 'start' else checkpoint_lib.load_stage(folder)[0]
    out = rl_tasks.sample_rows(programs, params, list(prompts.eval_ids),
                               batch=rc['ppo']['batch_size'], width=rc['data']['max_prompt_tokens'],
                               key=jax.random.key(rc['seed'] + 303))
    g = gold(rl_tasks.response_texts(tokenizer, out['tokens'], out['lengths'], prompts.stop_id))
    half = 1.96 * float(g.std()) / np.sqrt(len(g))
    evals[name] = dict(gold=float(g.mean()), gold_lo=float(g.mean()) - half,
                       gold_hi=float(g.mean()) + half, n=len(g))
  summary.update(method='dpo', pairs=stats, gold=evals, prompts=dict(
      train=len(prompts.train_ids), eval=len(prompts.eval_ids)))
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / dpo.SUMMARY_FILE, summary)
  return summary


def overall_eta(config, times: dict, this_run: dict, stage_index: int) -> float:
  """Seconds left for the stages from `stage_index` on: their `budget_minutes`, scaled by
  how long this run's finished stages took against their budgets (1 before any)."""
  budget = {s: 60.0 * float(config.budget_minutes[s]) for s in STAGES}
  spent = sum(this_run.values())
  planned = sum(budget[s] for s in this_run)
  scale = spent / planned if planned > 0 else 1.0
  return scale * sum(budget[s] for s in STAGES[stage_index:])


def run(config, workdir) -> dict:
  """Runs (or resumes) every stage in order; returns the report card's dict."""
  check_config(config)
  workdir = pathlib.Path(workdir)
  if config.from_stage and jax.process_index() == 0:
    _move_aside(workdir, config.from_stage)
  workdir.mkdir(parents=True, exist_ok=True)
  common.barrier('pipeline:start')  # every process sees the folders after the move
  times_path = workdir / TIMES_FILE
  times = json.loads(times_path.read_text()) if times_path.exists() else {}
  cpu_path = workdir / CPU_FILE
  cpu = json.loads(cpu_path.read_text()) if cpu_path.exists() else {}
  for stage in STAGES[STAGES.index(config.from_stage):] if config.from_stage else ():
    times.pop(stage, None)  # its folder was moved aside: its time restarts from zero
    cpu.pop(stage, None)
  start_all, this_run = time.time(), {}
  for i, stage in enumerate(STAGES, 1):
    if _done(workdir, stage):
      common.log(f'== [{i}/{len(STAGES)}] {stage}: done before, skipped')
      continue
    if stage == 'evaluate' and jax.process_count() > 1:
      # The evaluation (sampling with live tools, the harness, the limitation models) is
      # a one-process program: `main` hands it to process 0 as a fresh single process.
      return dict(evaluate_as_one_process=True)
    eta = overall_eta(config, times, this_run, i - 1)
    common.log(f'\n== [{i}/{len(STAGES)}] {stage} in {workdir / stage}  (overall: '
               f'{(time.time() - start_all) / 60:.1f} min so far, about {eta / 60:.1f} min '
               'to go)')
    start, start_cpu = time.time(), time.process_time()
    if stage == 'pretrain':
      result = pretrain.train(config.pretrain, workdir / 'pretrain')
    elif stage == 'sft':
      result = sft.finetune(config.sft, workdir / 'sft', workdir / 'pretrain')
    elif stage == 'rlhf' and config.rl_method == 'dpo':
      result = run_dpo(config, workdir / 'rlhf', workdir / 'sft')
    elif stage == 'rlhf':
      result = rlhf.run(config.rlhf, workdir / 'rlhf', workdir / 'sft')
    else:
      result = pipeline_eval.run(
          config.evaluate, workdir / 'evaluate',
          dict(pretrain=workdir / 'pretrain', sft=workdir / 'sft', rl=policy_dir(workdir)),
          lambda folder: limitations.run(config.evaluate.limitations, folder))
    this_run[stage] = time.time() - start
    times[stage] = times.get(stage, 0.0) + this_run[stage]
    cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - start_cpu
    if jax.process_index() == 0:
      times_path.write_text(json.dumps(times, indent=2))
      cpu_path.write_text(json.dumps(cpu, indent=2))
    if result.get('interrupted') and not _done(workdir, stage):
      common.log(f'{stage} stopped early: run the same command again to resume')
      return {}
    common.log(f'== {stage} finished ({times[stage] / 60:.1f} min in all; '
               f'{(time.time() - start_all) / 60:.1f} min of this run so far)')
  card = pipeline_report.write(workdir) if jax.process_index() == 0 else {}
  return card


def closing_lines(card: dict, workdir) -> str:
  """The last lines printed: the headline, where the report is, the next commands."""
  workdir = pathlib.Path(workdir)
  policy = policy_dir(workdir)
  return '\n'.join([
      '', pipeline_report.headline(card), '',
      f'report card: {workdir / "report.md"} (and report.json, plots beside it)',
      'next:',
      f'  python -m experiments.chat --workdir={workdir / "sft"} --tools --temperature=0 '
      f'--system="$(cat {workdir / "evaluate" / pipeline_eval.SYSTEM_FILE})" '
      '--prompt="Sam has 5 pens. He buys 3 more. How many pens does Sam have?"',
      f'  python -m experiments.chat --workdir={policy}   # the final policy',
      f'  python -m experiments.evaluate --workdir={workdir / "sft"} --tasks=piqa_local '
      '--limit=200',
      '  python -m experiments.pipeline --config=configs/pipeline.py:small   # a bigger run',
      f'  python -m experiments.pipeline --workdir={workdir} --config.rl_method=grpo '
      '--config.from_stage=rlhf'])


def main(config, workdir):
  common.maybe_initialize_distributed()
  card = run(config, workdir)
  if card.get('evaluate_as_one_process'):
    # Every process leaves jax.distributed together (its shutdown is a barrier); process 0
    # then becomes the same command as one process (same pid, so a launcher keeps
    # waiting on it), which skips the finished stages, evaluates and writes the card.
    first = jax.process_index() == 0
    common.log('== evaluate: on process 0 alone, as a one-process run of the same command')
    sys.stdout.flush()
    sys.stderr.flush()
    jax.distributed.shutdown()
    if first:
      os.execve(sys.executable, [sys.executable, '-m', 'experiments.pipeline', *sys.argv[1:],
                                 '--config.from_stage='], common.one_process_env(os.environ))
    return
  if card:
    common.log(closing_lines(card, workdir))


if __name__ == '__main__':
  common.run_experiment(main, 'configs/pipeline.py:tiny', 'runs/pipeline')
