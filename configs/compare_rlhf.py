"""RLHF methods study: `--config=configs/compare_rlhf.py[:PRESET]`, with `--init=WORKDIR`.

Every arm starts from the same init policy (an SFT or pretraining workdir), works on the
positive-continuations task of configs/rlhf.py (same prompt pool, same evaluation
prompts, gold = VADER) against one proxy reward model, and samples the same number of
responses (`responses` = ppo.iterations × ppo.batch_size):
  ppo, grpo, rloo, dr_grpo  experiments.rlhf with that advantage estimator (`rl_arms`)
  dpo        experiments.dpo on proxy-labelled pairs of the init policy's own samples:
             responses / 2 training prompts × 2 samples, the higher proxy = chosen
  best_of_n  responses / data.eval_prompts samples per evaluation prompt, best-of-n for
             every n up to that (the unbiased estimate over all n-subsets)
The proxy is trained once, by the first RL arm of the first seed (configs/rlhf.py's
`reward_model` and `pairs` sections), unless `reward_model_workdir` names one.

Presets:
  cpu (default)  the tiny SFT model, 2 seeds, 8 iterations × 32 responses per RL run
                 (256 sampled responses per arm and seed), 32 evaluation prompts,
                 evaluations every 2 iterations; a proxy from 512 prompts × 4 samples,
                 80 steps; sized for ~30-45 min on 2 CPU cores shared by many jobs
  test           seconds, for tests
"""
import ml_collections

from configs import dpo as dpo_config
from configs import rlhf as rlhf_config

RL_ARMS = {
    'ppo': dict(advantage='gae', group_size=1),
    'grpo': dict(advantage='grpo', group_size=4),
    'rloo': dict(advantage='rloo', group_size=4),
    'dr_grpo': dict(advantage='dr_grpo', group_size=4),
}
ARMS = (*RL_ARMS, 'dpo', 'best_of_n')

PRESETS = {
    'cpu': dict(rlhf='default', seeds=(0, 1), iterations=8, batch=32, eval_every=2,
                eval_prompts=32, rm_prompts=512, rm_steps=80, rm_batch=32, dpo_steps=24,
                dpo_segments=4, dpo_batch=16, dpo_lr=5e-5, bootstrap=2000),
    'test': dict(rlhf='test', seeds=(0, 1), iterations=4, batch=8, eval_every=2,
                 eval_prompts=8, rm_prompts=48, rm_steps=6, rm_batch=8, dpo_steps=4,
                 dpo_segments=2, dpo_batch=4, dpo_lr=1e-3, bootstrap=200),
}


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  preset = arg or 'cpu'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.init = ''  # an SFT (or pretraining) workdir; or pass --init=...
  c.seeds = p['seeds']
  c.arms = ARMS
  c.rl_arms = ml_collections.ConfigDict(RL_ARMS)
  c.reward_model_workdir = ''  # '' : trained by the first RL arm of the first seed

  # The RL arms' config (configs/rlhf.py); its task, data, gold and evaluation are every
  # arm's. Best-of-n is its own arm, so the RL runs skip theirs (n = 1 only).
  r = rlhf_config.get_config(p['rlhf'])
  r.preset = f'compare_rlhf:{preset}'
  r.ppo.iterations = p['iterations']
  r.ppo.batch_size = p['batch']
  r.eval.every = p['eval_every']
  r.eval.best_of_n = (1,)
  r.checkpoint_every = p['eval_every']
  r.data.eval_prompts = p['eval_prompts']
  r.pairs.num_prompts = p['rm_prompts']
  r.pairs.pairs_per_prompt = 2
  r.reward_model.train.steps = p['rm_steps']
  r.reward_model.data.batch_size = p['rm_batch']
  r.reward_model.optimizer.warmup_steps = max(1, p['rm_steps'] // 10)
  c.rlhf = r

  # The DPO arm (configs/dpo.py): its pairs are given as arrays, so data.source is unused.
  d = dpo_config.get_config('test' if preset == 'test' else 'jsonl')
  d.data.batch_size = p['dpo_batch']
  d.data.seq_len = r.reward_model.data.seq_len  # prompt + response + stop
  d.train.steps = p['dpo_steps']
  d.optimizer.total_steps = p['dpo_steps']  # one schedule over all segments
  d.optimizer.learning_rate = p['dpo_lr']
  d.optimizer.warmup_steps = max(1, p['dpo_steps'] // 10)
  d.train.eval_every = 0
  d.train.checkpoint_every = 0
  d.dpo.beta = 0.1
  d.eval.batch_size = 32
  c.dpo = d
  c.dpo_segments = p['dpo_segments']  # evaluations along DPO training (after each segment)
  c.dpo_min_gap = 0.0  # proxy-labelled pairs: |Δproxy| below this is a tie, skipped

  c.fit = ml_collections.ConfigDict()
  c.fit.bootstrap_samples = p['bootstrap']
  c.fit.confidence = 0.95
  c.fit.min_seeds_for_seed_bootstrap = 3  # fewer seeds: resample checkpoints instead
  return c
