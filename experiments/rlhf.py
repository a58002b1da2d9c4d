"""RLHF: a reward model from preferences, PPO against it, best-of-n, over-optimisation.

  python -m experiments.rlhf --config=configs/rlhf.py --init=runs/sft --workdir=runs/rlhf

Reads top to bottom as the run does (`run`): prompts -> proxy reward model -> best-of-n
-> PPO on the shared loop -> the final policy saved as a stage. The default task is
Ziegler et al. 2019's "positive continuations" at toy scale (research/rl_tasks.py):
prompts are the first 4-8 words of sentences of the init's *held-out* pretraining
documents; the gold reward is VADER sentiment of the continuation, measured everywhere
and never optimised; the proxy is a reward model (experiments.reward_model) trained on
pairs of the init policy's own continuations labelled by gold, with prompt-disjoint
held-out accuracy; PPO is research/ppo.py's jitted iteration with an adaptive KL penalty
to the init policy; best-of-n (n = 1..16) picks the sample the proxy scores highest, at
KL = log n − (n − 1)/n; evaluations (start, every `eval.every` iterations, end) sample
the fixed evaluation prompts with the same key: proxy, gold, KL from the init, entropy.
The `hh` preset uses hh-rlhf prompts through the chat template and no gold reward.

Outputs in WORKDIR: metrics.jsonl, summary.json, report.md and the over-optimisation
plots (Gao et al. 2022; rebuilt from the files by `python -m experiments.rlhf_report
--workdir=...`), reward_model/ (the proxy) and policy/ (`checkpoint.load_stage`). The PPO
state and the prompt sampler's position are checkpointed every `checkpoint_every`
iterations; a killed run resumes exactly, SIGTERM / Ctrl-C save and exit
(experiments/loop.py).
"""
import dataclasses
import functools
import json
import math
import pathlib
import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import loop as loop_lib
from experiments import reward_model as rm_stage
from experiments import rlhf_report
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import model as model_lib
from research import ppo
from research import rl_tasks
from research import sharding

RM_SUMMARY = 'reward_model_summary.json'
BEST_OF_N = 'best_of_n.json'
POLICY_DIR = 'policy'
PPO_FIELDS = tuple(f.name for f in dataclasses.fields(ppo.PPOConfig))
encode, response_texts, sample_rows = rl_tasks.encode, rl_tasks.response_texts, rl_tasks.sample_rows


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


def load_prompts(config: dict, init_workdir, tokenizer) -> rl_tasks.Prompts:
  """The task's training pool and fixed evaluation prompts (rl_tasks.load_prompts)."""
  try:
    prompts = rl_tasks.load_prompts(config, init_workdir, tokenizer)
  except rl_tasks.TaskError as e:
    raise common.UserError(str(e)) from None
  if prompts.note:
    common.log(f'note: {prompts.note}')
  return prompts


# --------------------------------------------------------------------------------------
# The proxy reward model
# --------------------------------------------------------------------------------------


def gold_pairs(programs, params, prompts, tokenizer, gold, config) -> tuple[tuple, dict]:
  """2k samples of the init policy per training prompt, paired and labelled by gold
  (rl_tasks.policy_gold_pairs) -> ((train arrays, held-out arrays), stats)."""
  try:
    return rl_tasks.policy_gold_pairs(programs, params, prompts, tokenizer, gold, config)
  except rl_tasks.TaskError as e:
    raise common.UserError(str(e)) from None


def heldout_summary(rm_summary: dict) -> dict:
  """The held-out part of a reward-model stage summary."""
  h = rm_summary.get('heldout') or {}
  return dict(accuracy=h.get('accuracy'), interval=h.get('interval'), margin=h.get('margin'),
              n=h.get('n'))


def reward_stage(config, workdir: pathlib.Path, init_workdir, policy_params, programs,
                 prompts, tokenizer, gold) -> Optional[tuple[Any, Any, float, dict]]:
  """Trains (or loads) the proxy -> (rm params, rm cfg, offset, record for the report);
  None when its training was interrupted."""
  external = config['reward_model_workdir']
  rm_dir = pathlib.Path(external) if external else workdir / 'reward_model'
  record_path = workdir / RM_SUMMARY
  if external:
    record = {'workdir': str(rm_dir), 'trained_here': False}
    if (rm_dir / rm_stage.SUMMARY_FILE).exists():
      rm_summary = json.loads((rm_dir / rm_stage.SUMMARY_FILE).read_text())
      record.update(heldout=heldout_summary(rm_summary), minutes=rm_summary.get('minutes'))
  elif record_path.exists():
    record = json.loads(record_path.read_text())
  else:
    # The proxy trains on the RL stage's mesh (on several processes it must span them all).
    rm_config = dict(config['reward_model'], init=str(init_workdir), mesh=config['mesh'])
    pairs, stats = None, {}
    if config['task'] == 'continuation':
      pc = config['pairs']
      common.log(f'reward model data: {2 * pc["pairs_per_prompt"]} samples of the init policy '
                 f'for each of {min(pc["num_prompts"], len(prompts.train_ids))} prompts, '
                 'labelled by gold')
      pairs, stats = gold_pairs(programs, policy_params, prompts, tokenizer, gold, config)
      common.log(f'  {stats["pairs"]} pairs ({stats["near_ties"]} near-ties skipped), '
                 f'{stats["train_pairs"]} train / {stats["heldout_pairs"]} held out; '
                 f'{stats["sampling_seconds"]:.0f}s')
    summary = rm_stage.train(rm_config, rm_dir, init_workdir, pairs=pairs)
    if summary.get('interrupted'):
      return None
    record = dict(workdir=str(rm_dir), trained_here=True, pairs=stats,
                  heldout=heldout_summary(summary), minutes=summary.get('minutes'),
                  summary=summary)
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(record_path, record)
  rm_params, rm_cfg, rm_tokenizer, offset = checkpoint_lib.load_reward_model(rm_dir)
  if rm_tokenizer.fingerprint != tokenizer.fingerprint:
    raise common.UserError(f'reward model {rm_dir} uses another tokenizer than the init policy')
  return rm_params, rm_cfg, float(offset), record


def run_best_of_n(programs, params, prompts, tokenizer, gold, rm, config) -> dict:
  ns = tuple(config['eval']['best_of_n'])
  k = max(ns)
  start = time.time()
  ids = [p for p in prompts.eval_ids for _ in range(k)]  # prompt i: rows [i·k, (i+1)·k)
  out = sample_rows(programs, params, ids, batch=config['ppo']['batch_size'],
                    width=config['data']['max_prompt_tokens'],
                    key=jax.random.key(config['seed'] + 202), rm=rm)
  p = len(prompts.eval_ids)
  gold_PxK = None if gold is None else gold(response_texts(
      tokenizer, out['tokens'], out['lengths'], prompts.stop_id)).reshape(p, k)
  return dict(rows=rl_tasks.best_of_n(out['proxy'].reshape(p, k), gold_PxK, ns), prompts=p,
              samples_per_prompt=k, seconds=time.time() - start)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def ppo_config(config: dict) -> ppo.PPOConfig:
  pc = config['ppo']
  return ppo.PPOConfig(**{k: pc[k] for k in PPO_FIELDS})


def check_config(config: dict, policy_cfg) -> None:
  pc, dc = config['ppo'], config['data']
  try:
    cfg = ppo_config(config)
  except ValueError as e:
    raise common.UserError(str(e)) from None
  if config['task'] not in ('continuation', 'hh'):
    raise common.UserError(f"task={config['task']!r}: expected 'continuation' or 'hh'")
  if pc['batch_size'] % pc['minibatches']:
    raise common.UserError(f'ppo.batch_size={pc["batch_size"]} is not divisible by '
                           f'ppo.minibatches={pc["minibatches"]}')
  if cfg.estimator.groups and pc['batch_size'] % cfg.group_size:
    raise common.UserError(f'ppo.batch_size={pc["batch_size"]} is not a multiple of '
                           f'ppo.group_size={cfg.group_size}')
  if policy_cfg.position == 'learned' and dc['max_prompt_tokens'] + pc['max_new_tokens'] > \
      policy_cfg.max_len:
    raise common.UserError('data.max_prompt_tokens + ppo.max_new_tokens exceed the model\'s '
                           f'{policy_cfg.max_len} positions')
  if config['task'] == 'continuation' and config['gold'] == 'none' and \
      not config['reward_model_workdir']:
    raise common.UserError('the continuation task labels its reward-model pairs by gold: set '
                           'gold=vader or give reward_model_workdir')
  if min(config['eval']['best_of_n']) < 1:
    raise common.UserError('eval.best_of_n: every n must be >= 1')


def run(config, workdir, init_workdir) -> dict:
  """The whole experiment (resumable): prompts -> proxy reward model -> best-of-n -> PPO
  -> the final policy as a stage -> summary.json, report.md and plots."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  config = json.loads(json.dumps(config))  # tuples -> lists, as config.json holds them
  common.validate_config(config)
  common.check_workdir(workdir)
  workdir = pathlib.Path(workdir)
  t_start = time.time()
  try:
    gold = rl_tasks.make_gold(config['gold'])
  except rl_tasks.TaskError as e:
    raise common.UserError(str(e)) from None
  if not init_workdir:
    raise common.UserError('no init workdir: pass --init=runs/sft (an SFT or pretraining run)')
  init_params, init_config, tokenizer = checkpoint_lib.load_stage(init_workdir)
  policy_cfg = model_lib.TransformerConfig.from_dict(init_config['model'])
  if policy_cfg.scalar_head:
    raise common.UserError(f'{init_workdir} holds a reward/value model, not a policy')
  check_config(config, policy_cfg)
  mesh = common.make_mesh(config['mesh']['shape'])
  ppo.check_mesh(policy_cfg, ppo_config(config), config['ppo']['batch_size'], mesh)
  config['init'] = str(init_workdir)
  config['model'] = init_config['model']
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, config, workdir,
                                    keys=('model', 'data', 'pairs', 'reward_model'))
    for key in ('init', 'task', 'gold', 'score_with_stop', 'reward_model_workdir', 'seed'):
      if saved.get(key) != config[key]:
        raise checkpoint_lib.CheckpointError(
            f'workdir {workdir} holds a run with {key}={saved.get(key)!r}, not '
            f'{config[key]!r}: use a new --workdir')
  prompts = load_prompts(config, init_workdir, tokenizer)  # before anything is written
  workdir.mkdir(parents=True, exist_ok=True)
  if saved is None and jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
  common.log(f'prompts: {len(prompts.train_ids)} training, {len(prompts.eval_ids)} evaluation '
             f'({config["task"]}); e.g. {prompts.eval_text[0]!r}')
  pc = config['ppo']
  n, width, b = pc['max_new_tokens'], config['data']['max_prompt_tokens'], pc['batch_size']
  programs_for = functools.partial(ppo.RolloutPrograms.make, policy_cfg, n=n, stop_id=prompts.stop_id,
                                   pad_id=tokenizer.pad_id, close=config['score_with_stop'],
                                   fast=config['fast_compile'])

  # 1. The proxy reward model.
  t0 = time.time()
  stage = reward_stage(config, workdir, init_workdir, init_params, programs_for(None), prompts,
                       tokenizer, gold)
  if stage is None:
    common.log('reward model training was interrupted: run again to resume')
    return dict(step=0, interrupted=True)
  rm_params, rm_cfg, offset, rm_record = stage
  acc = rm_record.get('heldout', {}).get('accuracy')
  common.log(f'reward model {rm_record["workdir"]}: held-out accuracy '
             f'{acc if acc is None else round(acc, 3)}, offset {offset:.3f} '
             f'({time.time() - t0:.0f}s)')
  programs, rm, ref_params = programs_for(rm_cfg), (rm_params, offset), init_params

  # 2. Best-of-n from the init policy (once; kept in the workdir).
  bon_path = workdir / BEST_OF_N
  if bon_path.exists():
    bon = json.loads(bon_path.read_text())
  else:
    bon = run_best_of_n(programs, ref_params, prompts, tokenizer, gold, rm, config)
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(bon_path, bon)
    common.log('best-of-n: ' + ', '.join(
        f'n={r["n"]} proxy {r["proxy"]:.3f}' + ('' if r['gold'] is None else
                                                f' gold {r["gold"]:.3f}')
        for r in bon['rows']) + f' ({bon["seconds"]:.0f}s)')

  # 3. PPO on the shared loop: a step is one jitted iteration (rollout, rewards,
  # advantages, clipped updates) + the gold score of its rollouts.
  cfg = ppo_config(config)
  groups = cfg.estimator.groups  # GRPO, RLOO, Dr. GRPO: k samples of each prompt
  # The iteration runs on the mesh: the state sharded as in pretraining, each process
  # feeding its rows of the prompts. Evaluations, best-of-n and samples run on each
  # process's own whole copy of the params (`sharding.host_local`), identically.
  iteration, tx_policy, tx_value = ppo.jitted_iteration(
      policy_cfg, rm_cfg, cfg, float(pc['policy_lr']), float(pc['value_lr']),
      float(pc['grad_clip']), prompts.stop_id, tokenizer.pad_id, config['score_with_stop'],
      config['fast_compile'], mesh)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # separate buffers: the state is donated
  state = ppo.init_ppo_state(copy(init_params), tx_policy, cfg,
                             jax.random.fold_in(jax.random.key(config['seed']), 7),
                             value_params=copy(rm_params) if cfg.estimator.value_model else None, tx_value=tx_value)
  # Committed to the mesh like a restored state, so a resumed run reuses the compile.
  state = sharding.place(state, iteration.state_shardings)
  mesh_ref = sharding.place(ref_params, ppo.param_shardings(policy_cfg, mesh))
  mesh_rm = (sharding.place(rm_params, ppo.param_shardings(rm_cfg, mesh)), offset)
  rows = sharding.process_rows(mesh, b)  # this process's rows of every prompt batch
  sampler = data_lib.EpochSampler(len(prompts.train_ids), b // cfg.group_size if groups else b,
                                  config['seed'])
  evals, timing = [], dict(ppo_seconds=0.0, eval_seconds=0.0, compile_seconds=0.0)
  calls = [0]  # iterations of this process: the first one compiles

  def step_fn(state, idx):
    prompt, lengths = encode([prompts.train_ids[i] for i in idx], width)
    if groups:
      prompt, lengths = ppo.repeat_prompts(prompt, lengths, cfg.group_size)
    t = time.perf_counter()
    state, metrics, rollout = iteration(state, np.asarray(prompt)[rows],
                                        np.asarray(lengths)[rows], mesh_ref, mesh_rm)
    row = {k: float(v) for k, v in sharding.host_local(metrics).items()}
    gen = sharding.host_local(rollout.generation)
    seconds = time.perf_counter() - t
    timing['compile_seconds' if not calls[0] else 'ppo_seconds'] += seconds
    calls[0] += 1
    row.update(proxy=row['score_mean'], sqrt_kl=math.sqrt(max(row['kl_k1'], 0.0)),
               seconds_iteration=seconds, prompt_position=sampler.position)
    if gold is not None:
      t = time.perf_counter()
      g = gold(response_texts(tokenizer, np.asarray(gen.tokens_BxN), np.asarray(gen.lengths_B),
                              prompts.stop_id))
      row.update(gold=float(g.mean()), gold_std=float(g.std()),
                 seconds_gold=time.perf_counter() - t)
    return state, row

  def run_eval(step, state):
    t = time.time()
    policy_params = sharding.host_local(state.policy_params)
    e = rl_tasks.evaluate_policy(programs, policy_params, ref_params, rm, prompts,
                                 tokenizer, gold, config)
    # One rollout batch alone, already compiled: the sampling share of an iteration.
    prompt, lengths = encode(prompts.eval_ids, width, b)
    start = time.perf_counter()
    jax.block_until_ready(programs.generate(policy_params, prompt, lengths,
                                            jax.random.key(0)))
    e.update(seconds_sample_batch=time.perf_counter() - start, iteration=step)
    evals.append(e)
    timing['eval_seconds'] += time.time() - t
    common.log(f'\neval @ {step}: proxy {e["proxy"]:.3f}' +
               ('' if gold is None else f', gold {e["gold"]:.3f}') +
               f', KL {e["kl_k1"]:.2f} (sqrt {e["sqrt_kl"]:.2f}), entropy {e["entropy"]:.2f}')
    return e

  progress = lambda r: (f'proxy {r["proxy"]:.3f}' + ('' if gold is None else
                                                      f' gold {r["gold"]:.3f}') +
                        f' KL {r["kl_k1"]:.2f} beta {r["beta"]:.3f} '
                        f'{r["seconds_iteration"]:.1f}s/it')
  with loop_lib.Loop(workdir, steps=pc['iterations'], checkpoint_every=config['checkpoint_every'],
                     keep=config['keep_checkpoints'], max_minutes=config['max_minutes'],
                     progress_fn=progress) as loop:
    restored = loop.restore(ppo.abstract_tree(ppo.state_tree(state)), sampler)
    if restored is not None:
      checkpoint_lib.check_tokenizer(restored.meta, tokenizer, workdir)
      state = ppo.state_from_tree(restored.state)
      evals, timing = restored.meta['evals'], restored.meta['timing']
    if not evals:
      loop.log(0, run_eval(0, state))
    loop.add_hook(run_eval, every=max(config['eval']['every'], 1), at_end=True)
    result = loop.run(state, step_fn, iter(sampler), first_step=int(state.step),
                      save_fn=ppo.state_tree,
                      meta_fn=lambda step: dict(evals=evals, timing=timing, seed=config['seed'],
                                                tokenizer_fingerprint=tokenizer.fingerprint))
  state, step = result.state, result.step
  if result.stopped_by_signal:  # saved; evaluated when resumed (a time cap reports now)
    common.log(f'stopped at iteration {step} of {pc["iterations"]}: run again to resume')
    return dict(step=step, interrupted=True)

  # 4. The final policy as a stage, samples, the summary; report and plots from the files.
  policy_dir = checkpoint_lib.save_params_stage(
      workdir / POLICY_DIR, dict(init_config, init=str(init_workdir), rlhf=str(workdir)),
      tokenizer, state.policy_params, step, rlhf=str(workdir))
  final_params = sharding.host_local(state.policy_params)
  samples = {name: rl_tasks.samples_table(programs, params, rm, prompts, tokenizer, gold, config)
             for name, params in (('before', ref_params), ('after', final_params))}
  train_rows = [r for r in loop_lib.read_metrics(workdir) if 'train/kl_k1' in r]
  iter_seconds = [r['train/seconds_iteration'] for r in train_rows[1:]] or \
      [r['train/seconds_iteration'] for r in train_rows]
  pairs_seconds = (rm_record.get('pairs') or {}).get('sampling_seconds', 0)
  summary = dict(
      init=str(init_workdir), preset=config['preset'], task=config['task'],
      iterations=step, batch_size=b, max_new_tokens=n, advantage=cfg.advantage,
      prompts=dict(train=len(prompts.train_ids), eval=len(prompts.eval_ids)),
      reward_model=dict(workdir=rm_record['workdir'], heldout=rm_record.get('heldout'),
                        trained_here=rm_record.get('trained_here'),
                        offset=offset, pairs=rm_record.get('pairs'),
                        minutes=rm_record.get('minutes')),
      start=evals[0], end=evals[-1], evals=evals, best_of_n=bon['rows'], samples=samples,
      policy_workdir=str(policy_dir), seconds_per_iteration=statistics.median(iter_seconds),
      seconds_sample_batch=statistics.median([e['seconds_sample_batch'] for e in evals]),
      timing=timing, best_of_n_seconds=bon.get('seconds'), final_beta=float(state.beta),
      wall_minutes_this_call=(time.time() - t_start) / 60, loop=result.record(),
      # Stages of this workdir (an external reward model's training is not counted).
      wall_minutes=(((rm_record.get('minutes') or 0) if rm_record.get('trained_here') else 0) +
                    pairs_seconds / 60 + (bon.get('seconds') or 0) / 60 +
                    sum(timing.values()) / 60))
  if jax.process_index() == 0:
    summary['plots'] = rlhf_report.make_plots(workdir, summary, config, train_rows)
    checkpoint_lib.write_json_atomic(workdir / 'summary.json', summary)
    (workdir / 'report.md').write_text(rlhf_report.report(summary, config))
  return summary


def main(config, workdir):
  common.maybe_initialize_distributed()
  summary = run(config, workdir, config.init)
  if summary.get('interrupted'):
    return
  if jax.process_index() == 0:  # the only process that wrote it
    common.log('\n' + (pathlib.Path(workdir) / 'report.md').read_text())


if __name__ == '__main__':
  common.run_experiment(main, 'configs/rlhf.py', 'runs/rlhf')
