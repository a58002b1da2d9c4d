"""Which RLHF method gets the most gold reward per nat of KL, at matched budgets.

  python -m experiments.compare_rlhf --config=configs/compare_rlhf.py --init=runs/sft \
      --workdir=runs/compare_rlhf

On the positive-continuations task (experiments/rlhf.py, research/rl_tasks.py: gold =
VADER, never optimised; proxy = a reward model trained on gold-labelled pairs of the
init policy's samples), every arm starts from the same init policy, uses the same
training prompt pool and the same evaluation prompts, and samples the same number of
responses (asserted before anything runs):
  ppo, grpo, rloo, dr_grpo  `experiments.rlhf.run` with that advantage estimator; its
             evaluations along training are the curve
  dpo        `experiments.dpo.train` on proxy-labelled pairs of the init policy's own
             samples, trained in segments (one LR schedule), evaluated after each
  best_of_n  K samples per evaluation prompt, best-of-n for n = 1..K by proxy
Every curve point is (√KL to the init policy, proxy, gold) on the evaluation prompts
(rl_tasks.evaluate_policy; best-of-n: the analytic KL). The first RL arm of the first
seed trains the proxy (unless `reward_model_workdir` names one) and all arms use it.

The study folder holds one folder per arm and seed, study.json (config, budgets, the
proxy's record) and results.json (curves and timings); report.md, reward_vs_kl.png and
the Gao et al. 2022 fits are rebuilt from those two by experiments/compare_rlhf_report.py.
Resumable: finished arms are read back, an interrupted RL or DPO run resumes.
"""
import json
import pathlib
import time
from typing import Optional

import jax
import numpy as np

from experiments import common
from experiments import compare_rlhf_report as report_lib
from experiments import dpo as dpo_stage
from experiments import rlhf as rlhf_stage
from research import checkpoint as checkpoint_lib
from research import evaluation
from research import model as model_lib
from research import ppo
from research import rl_tasks

RESULT_FILE = 'result.json'  # an arm and seed that finished
DPO_EVALS = 'dpo_evals.json'  # the DPO arm's evaluations so far (its resume point)
PAIRS_FILE = 'pairs.npz'
EVAL_KEYS = ('proxy', 'proxy_lo', 'proxy_hi', 'gold', 'gold_lo', 'gold_hi', 'kl_k1', 'kl_k3',
             'sqrt_kl', 'entropy')


class BudgetError(AssertionError):
  """Arms that would not sample the same number of responses: the comparison is void."""


# ----------------------------------------------------------------------------
# Arms and their budget.


def rl_config(config: dict, arm: str, seed: int, rm_dir: Optional[str]) -> dict:
  """configs/rlhf.py's config of one RL arm and seed (rm_dir None: it trains the proxy)."""
  c = json.loads(json.dumps(config['rlhf']))
  c['ppo'].update(config['rl_arms'][arm])
  c['seed'] = int(seed)
  c['reward_model_workdir'] = rm_dir or ''
  return c


def arm_budgets(config: dict) -> dict:
  """{arm: {responses, prompts, ...}}: what each arm samples, from the config alone.
  Raises UserError when the budget cannot be split as the arm needs."""
  r = config['rlhf']
  responses = r['ppo']['iterations'] * r['ppo']['batch_size']
  eval_prompts = r['data']['eval_prompts']
  out = {}
  for arm in config['arms']:
    if arm in config['rl_arms']:
      g = config['rl_arms'][arm]['group_size']
      if r['ppo']['batch_size'] % g:
        raise common.UserError(f'rlhf.ppo.batch_size={r["ppo"]["batch_size"]} is not a multiple '
                               f'of rl_arms.{arm}.group_size={g}')
      out[arm] = dict(responses=responses, prompts=responses // g, per_prompt=g,
                      prompt_set='train')
    elif arm == 'dpo':
      if responses % 2:
        raise common.UserError(f'{responses} responses cannot be split into DPO pairs')
      out[arm] = dict(responses=responses, prompts=responses // 2, per_prompt=2,
                      prompt_set='train')
    elif arm == 'best_of_n':
      if responses % eval_prompts:
        raise common.UserError(f'{responses} responses are not a multiple of '
                               f'rlhf.data.eval_prompts={eval_prompts} (best-of-n)')
      out[arm] = dict(responses=responses, prompts=eval_prompts,
                      per_prompt=responses // eval_prompts, prompt_set='eval')
    else:
      raise common.UserError(f'arm {arm!r}: expected one of '
                             f'{sorted([*config["rl_arms"], "dpo", "best_of_n"])}')
  return out


def check_equal_budget(budgets: dict) -> None:
  """Raises BudgetError unless every arm samples the same number of responses."""
  counts = {arm: b['responses'] for arm, b in budgets.items()}
  if len(set(counts.values())) > 1:
    raise BudgetError(f'unequal budget: sampled responses per arm {counts}')


def _read(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _point(e: dict, x) -> dict:
  return dict({k: e.get(k) for k in EVAL_KEYS}, x=x)


def _timed(fn):
  wall, cpu = time.time(), time.process_time()
  out = fn()
  return out, dict(wall_seconds=time.time() - wall, cpu_seconds=time.process_time() - cpu)


# ----------------------------------------------------------------------------
# The arms.


def run_rl_arm(config, arm, seed, run_dir, init, rm_dir) -> Optional[dict]:
  """experiments.rlhf.run -> the arm's record (None: interrupted)."""
  summary, timing = _timed(lambda: rlhf_stage.run(rl_config(config, arm, seed, rm_dir),
                                                  run_dir, init))
  if summary.get('interrupted'):
    return None
  curve = [_point(e, e['iteration']) for e in summary['evals']]
  return dict(arm=arm, seed=seed, curve=curve, x_name='iteration', timing=timing,
              reward_model=summary['reward_model'], advantage=summary['advantage'])


class Task:
  """What the DPO and best-of-n arms share: the init policy, prompts, gold, the proxy and
  the jitted sampling / scoring / KL programs (rl_tasks.sample_rows' `programs`)."""

  def __init__(self, config: dict, init, rm_dir):
    r = config['rlhf']
    self.params, init_config, self.tokenizer = checkpoint_lib.load_stage(init)
    policy_cfg = model_lib.TransformerConfig.from_dict(init_config['model'])
    rm_params, rm_cfg, _, offset = checkpoint_lib.load_reward_model(rm_dir)
    self.rm = (rm_params, offset)
    try:
      self.gold = rl_tasks.make_gold(r['gold'])
      self.prompts = rl_tasks.load_prompts(r, init, self.tokenizer)
    except rl_tasks.TaskError as e:
      raise common.UserError(str(e)) from None
    self.programs = ppo.RolloutPrograms.make(
        policy_cfg, rm_cfg, n=r['ppo']['max_new_tokens'], stop_id=self.prompts.stop_id,
        pad_id=self.tokenizer.pad_id, close=r['score_with_stop'], fast=r['fast_compile'])

  def evaluate(self, params, seed: int, config: dict) -> dict:
    """The RL arms' evaluation (same prompts, same key for a seed) of any policy."""
    return rl_tasks.evaluate_policy(self.programs, params, self.params, self.rm, self.prompts,
                                    self.tokenizer, self.gold, dict(config['rlhf'], seed=seed))

  def sample(self, id_lists, key, config) -> dict:
    r = config['rlhf']
    out = rl_tasks.sample_rows(self.programs, self.params, id_lists,
                               batch=r['ppo']['batch_size'], width=r['data']['max_prompt_tokens'],
                               key=key, rm=self.rm)
    out['texts'] = rl_tasks.response_texts(self.tokenizer, out['tokens'], out['lengths'],
                                           self.prompts.stop_id)
    return out


def dpo_pairs(task: Task, config: dict, seed: int, budget: dict, path: pathlib.Path):
  """Proxy-labelled pairs of the init policy's samples (2 per prompt, `budget['prompts']`
  training prompts drawn by the seed) -> ((train, held-out) arrays, stats); kept in `path`."""
  if path.exists():
    with np.load(path) as z:
      split = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
      return (split('train/'), split('held/')), json.loads(str(z['stats']))
  r = config['rlhf']
  pool = task.prompts.train_ids
  if budget['prompts'] > len(pool):
    raise common.UserError(f'the DPO arm needs {budget["prompts"]} training prompts, the pool '
                           f'has {len(pool)}')
  order = np.random.default_rng([seed, 5]).permutation(len(pool))[:budget['prompts']]
  ids = [pool[i] for i in order]
  out = task.sample([p for p in ids for _ in range(2)], jax.random.key(seed + 505), config)
  sub = rl_tasks.Prompts(train_text=[task.prompts.train_text[i] for i in order], train_ids=ids,
                         eval_text=[], eval_ids=[], stop_id=task.prompts.stop_id)
  try:
    (train, held), stats = rl_tasks.gold_labelled_pairs(
        sub, ids, out['tokens'], out['lengths'], out['proxy'], out['texts'], pairs_per_prompt=1,
        min_gap=config['dpo_min_gap'], close=r['score_with_stop'],
        seq_len=config['dpo']['data']['seq_len'],
        heldout_fraction=r['pairs']['heldout_fraction'], seed=seed)
  except rl_tasks.TaskError as e:
    raise common.UserError(f'DPO pairs: {e}') from None
  stats = dict(stats, labelled_by='proxy', samples=int(len(out['proxy'])),
               gold_agrees=_gold_agreement(out, task.gold))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp.npz')
  np.savez(tmp, stats=json.dumps(stats), **{f'train/{k}': v for k, v in train.items()},
           **{f'held/{k}': v for k, v in held.items()})
  tmp.replace(path)
  return (train, held), stats


def _gold_agreement(out: dict, gold) -> Optional[float]:
  """Share of a prompt's two samples where the proxy's preference agrees with gold's."""
  if gold is None:
    return None
  g = gold(out['texts']).reshape(-1, 2)
  p = np.asarray(out['proxy']).reshape(-1, 2)
  decided = g[:, 0] != g[:, 1]
  if not decided.any():
    return None
  return float(np.mean((g[decided, 0] > g[decided, 1]) == (p[decided, 0] > p[decided, 1])))


def run_dpo_arm(config, seed, run_dir: pathlib.Path, init, task: Task, budget) -> dict:
  """experiments.dpo.train in `dpo_segments` segments of one schedule, each followed by an
  evaluation; resumes at the first segment without a recorded evaluation."""
  t_wall, t_cpu = time.time(), time.process_time()
  pairs, stats = dpo_pairs(task, config, seed, budget, run_dir / PAIRS_FILE)
  state = _read(run_dir / DPO_EVALS) or dict(curve=[], timing=dict(wall_seconds=0.0,
                                                                      cpu_seconds=0.0))
  steps = config['dpo']['train']['steps']
  ends = sorted({round(steps * (j + 1) / config['dpo_segments']) for j in
                 range(config['dpo_segments'])})
  if not state['curve']:
    state['curve'].append(_point(task.evaluate(task.params, seed, config), 0))
  summary = None
  for end in ends:
    if any(p['x'] == end for p in state['curve']):
      continue
    dc = json.loads(json.dumps(config['dpo']))
    dc['seed'] = int(seed)
    dc['train']['steps'] = end
    summary = dpo_stage.train(dc, run_dir / 'policy', init, pairs=pairs)
    if summary['interrupted']:
      raise common.UserError(f'{run_dir}: DPO stopped early; rerun the same command to resume')
    params, _, _ = checkpoint_lib.load_stage(run_dir / 'policy')
    point = _point(task.evaluate(params, seed, config), end)
    state['curve'].append(dict(point, heldout_accuracy=summary['heldout']['accuracy']))
    common.log(f'dpo seed {seed} step {end}: proxy {point["proxy"]:.3f} gold '
               f'{point["gold"]:.3f} KL {point["kl_k1"]:.3f}')
    state['timing']['wall_seconds'] += time.time() - t_wall
    state['timing']['cpu_seconds'] += time.process_time() - t_cpu
    t_wall, t_cpu = time.time(), time.process_time()
    checkpoint_lib.write_json_atomic(run_dir / DPO_EVALS, state)
  return dict(arm='dpo', seed=seed, curve=state['curve'], x_name='step', timing=state['timing'],
              pairs={k: v for k, v in stats.items() if k != 'examples'})


def run_best_of_n_arm(config, seed, task: Task, budget) -> dict:
  """K samples per evaluation prompt -> best-of-n for every n <= K (rl_tasks.
  best_of_n_expected; KL = log n − (n − 1)/n)."""
  start, cpu = time.time(), time.process_time()
  k, p = budget['per_prompt'], len(task.prompts.eval_ids)
  out = task.sample([ids for ids in task.prompts.eval_ids for _ in range(k)],
                    jax.random.key(seed + 202), config)
  gold = None if task.gold is None else task.gold(out['texts']).reshape(p, k)
  proxy = out['proxy'].reshape(p, k)
  rows = rl_tasks.best_of_n_expected(proxy, gold, range(1, k + 1))
  curve = [dict(x=r['n'], proxy=r['proxy'], gold=r['gold'], kl_k1=r['kl'],
                sqrt_kl=r['sqrt_kl']) for r in rows]
  if gold is not None:  # 95 % t-intervals over the prompts, as the other arms' evaluations
    per_prompt = [rl_tasks.best_of_n_expected(proxy[i:i + 1], gold[i:i + 1], range(1, k + 1))
                  for i in range(p)]
    for j, point in enumerate(curve):
      s = evaluation.summarize([rows_i[j]['gold'] for rows_i in per_prompt])
      point.update(gold_lo=s['lo'], gold_hi=s['hi'])
  return dict(arm='best_of_n', seed=seed, curve=curve, x_name='n',
              timing=dict(wall_seconds=time.time() - start,
                          cpu_seconds=time.process_time() - cpu))


# ----------------------------------------------------------------------------
# The study.


def run_study(config, workdir, init) -> dict:
  """Runs (or reads back) every arm and seed, then writes the report; -> results."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  config = json.loads(json.dumps(config))
  common.validate_config(config)
  common.check_workdir(workdir)
  workdir = pathlib.Path(workdir)
  if not init:
    raise common.UserError('no init workdir: pass --init=runs/sft (an SFT or pretraining run)')
  if not (pathlib.Path(init) / checkpoint_lib.CONFIG_FILE).exists():
    raise common.UserError(f'--init={init}: no {checkpoint_lib.CONFIG_FILE} there')
  if not config['arms'] or not config['seeds']:
    raise common.UserError('config.arms and config.seeds must not be empty')
  if config['rlhf']['task'] != 'continuation' or config['rlhf']['gold'] == 'none':
    raise common.UserError('the study needs the continuation task with a gold reward')
  if config['dpo_segments'] < 1:
    raise common.UserError(f'dpo_segments={config["dpo_segments"]}: must be >= 1')
  budgets = arm_budgets(config)
  check_equal_budget(budgets)  # before anything is written
  rl_arms = [a for a in config['arms'] if a in config['rl_arms']]
  rm_dir = config['reward_model_workdir'] or None
  if rm_dir is None and not rl_arms:
    raise common.UserError('no RL arm to train the proxy: add one or set reward_model_workdir')
  owner = None if rm_dir else (rl_arms[0], config['seeds'][0])
  if owner:
    rm_dir = str(workdir / owner[0] / f'seed{owner[1]}' / 'reward_model')
  workdir.mkdir(parents=True, exist_ok=True)
  saved = _read(workdir / report_lib.STUDY_FILE)
  if saved and (saved['config']['rlhf'] != config['rlhf'] or saved['init'] != str(init)):
    raise checkpoint_lib.CheckpointError(f'{workdir} holds a study with another rlhf config or '
                                         'init: use a new --workdir')
  common.log(f'budget per arm (asserted equal): {json.dumps(budgets)}')
  order = ([owner] if owner else []) + [(a, s) for s in config['seeds'] for a in config['arms']
                                        if (a, s) != owner]
  task = None
  for arm, seed in order:
    run_dir = workdir / arm / f'seed{seed}'
    if (run_dir / RESULT_FILE).exists():
      common.log(f'{arm} seed {seed}: finished before, read back')
      continue
    common.log(f'\n== {arm} seed {seed} in {run_dir}')
    if arm in config['rl_arms']:
      record = run_rl_arm(config, arm, seed, run_dir, init,
                          None if (arm, seed) == owner else rm_dir)
      if record is None:
        common.log(f'{arm} seed {seed} was interrupted: run again to resume')
        return {}
    else:
      task = task or Task(config, init, rm_dir)
      run_dir.mkdir(parents=True, exist_ok=True)
      record = (run_dpo_arm(config, seed, run_dir, init, task, budgets[arm]) if arm == 'dpo'
                else run_best_of_n_arm(config, seed, task, budgets[arm]))
    record['budget'] = budgets[arm]
    checkpoint_lib.write_json_atomic(run_dir / RESULT_FILE, record)
    common.log(f'{arm} seed {seed}: done in {record["timing"]["wall_seconds"]:.0f}s wall, '
               f'{record["timing"]["cpu_seconds"]:.0f}s CPU')
    write_results(config, workdir, init, rm_dir, owner)  # a report so far after every arm
  return write_results(config, workdir, init, rm_dir, owner)


def write_results(config: dict, workdir: pathlib.Path, init, rm_dir: str, owner) -> dict:
  """results.json and study.json from the finished arms' files (None for an arm and seed
  not finished yet), then the report from those; -> results."""
  results = {arm: [_read(workdir / arm / f'seed{s}' / RESULT_FILE) for s in config['seeds']]
             for arm in config['arms']}
  rm_summary = _read(pathlib.Path(rm_dir) / 'summary.json') or {}
  owner_record = _read(workdir / owner[0] / f'seed{owner[1]}' / rlhf_stage.RM_SUMMARY) \
      if owner else None
  facts = dict(budgets=arm_budgets(config), reward_model=dict(
      workdir=rm_dir, heldout=(rm_summary.get('heldout') or {}),
      pairs=(owner_record or {}).get('pairs'), minutes=rm_summary.get('minutes'),
      trained_by=f'{owner[0]} seed {owner[1]}' if owner else None))
  report_lib.save_inputs(workdir, config, str(init), results, facts)
  report_lib.write(workdir)
  return results


def main(config, workdir):
  workdir = pathlib.Path(workdir)
  # The seeds of an arm compile the same programs: a persistent cache reads them back.
  jax.config.update('jax_compilation_cache_dir', str(workdir.absolute() / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  start, cpu = time.time(), time.process_time()
  results = run_study(config, workdir, config.init)
  if results:
    common.log('\n' + (workdir / 'report.md').read_text())
    common.log(f'study done in {time.time() - start:.0f}s wall, '
               f'{time.process_time() - cpu:.0f}s CPU: {workdir / "report.md"}')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/compare_rlhf.py', 'runs/compare_rlhf')
