"""The whole pipeline's config: `--config=configs/pipeline.py[:PRESET]`.

One section per stage, each the stage's own config (configs/pretrain.py, sft.py,
rlhf.py, whose `reward_model` section is the proxy reward model's), so any stage field
can be overridden: `--config.pretrain.train.steps=600`, `--config.rlhf.ppo.iterations=8`.

Presets:
  tiny   the README's main command: the `tiny` model (4.2M parameters) through every
         stage on the embedded corpus, sized for about 15 minutes on 2 CPU cores; each
         stage also has a time cap (train.max_minutes) that stops it early on a slow
         machine (a capped stage counts as finished, and its step count is then the one
         place a rerun can differ)
  small  the `small` model (13.8M), longer stages: an hour or more on 2 CPU cores
  gpu    the `gpu` model on one accelerator
  test   seconds per stage, for tests
"""
import ml_collections

from configs import pretrain as pretrain_config
from configs import rlhf as rlhf_config
from configs import sft as sft_config

PRESETS = {
    'tiny': dict(pretrain='tiny', sft='quick', rlhf='default', pretrain_steps=300,
                 pretrain_minutes=7.0, sft_steps=150, sft_minutes=3.0, rl_iterations=8,
                 rl_batch=32, rl_prompts=256, rm_steps=60, rl_eval_prompts=64,
                 rl_minutes=4.0),
    'small': dict(pretrain='small', sft='default', rlhf='default', pretrain_steps=3000,
                  pretrain_minutes=0.0, sft_steps=400, sft_minutes=0.0, rl_iterations=48,
                  rl_batch=64, rl_prompts=2400, rm_steps=200, rl_eval_prompts=128,
                  rl_minutes=0.0),
    'gpu': dict(pretrain='gpu', sft='default', rlhf='default', pretrain_steps=20000,
                pretrain_minutes=0.0, sft_steps=2000, sft_minutes=0.0, rl_iterations=200,
                rl_batch=64, rl_prompts=4800, rm_steps=1000, rl_eval_prompts=256,
                rl_minutes=0.0),
    'test': dict(pretrain='tiny', sft='test', rlhf='test', pretrain_steps=6,
                 pretrain_minutes=0.0, sft_steps=6, sft_minutes=0.0, rl_iterations=2,
                 rl_batch=8, rl_prompts=160, rm_steps=4, rl_eval_prompts=8, rl_minutes=0.0),
}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  preset = arg or 'tiny'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.from_stage = ''  # rerun from this stage on (earlier results are kept aside, not deleted)

  c.pretrain = pretrain_config.get_config(p['pretrain'])
  c.pretrain.train.steps = p['pretrain_steps']
  c.pretrain.train.max_minutes = p['pretrain_minutes']

  c.sft = sft_config.get_config(p['sft'])
  c.sft.train.steps = p['sft_steps']
  c.sft.train.max_minutes = p['sft_minutes']
  c.sft.data.seq_len = min(c.sft.data.seq_len, c.pretrain.data.seq_len)

  c.rlhf = rlhf_config.get_config(p['rlhf'])
  r = c.rlhf
  r.ppo.iterations = p['rl_iterations']
  r.ppo.batch_size = p['rl_batch']
  r.pairs.num_prompts = p['rl_prompts']
  r.reward_model.train.steps = p['rm_steps']
  r.reward_model.optimizer.warmup_steps = max(1, p['rm_steps'] // 10)
  r.data.eval_prompts = p['rl_eval_prompts']
  r.eval.every = max(1, p['rl_iterations'] // 4)
  r.checkpoint_every = max(1, p['rl_iterations'] // 4)
  r.max_minutes = p['rl_minutes']
  if preset == 'test':
    # The tiny test model's corpus is small: prompts from short sentences.
    r.data.min_sentence_words, r.data.min_words, r.data.max_words = 6, 2, 4
    c.pretrain.data.seq_len = 128
    c.pretrain.data.batch_size = 8
    c.pretrain.tokenizer.vocab_size = 512
    c.pretrain.model.d_model = 32
    c.pretrain.model.num_layers = 1
    c.pretrain.model.num_heads = 2
    c.pretrain.train.eval_every = 0
    c.pretrain.train.eval_batches = 1
    c.pretrain.train.num_samples = 1
    c.pretrain.train.sample_tokens = 4
    c.sft.data.seq_len = 128
    c.sft.eval.max_new_tokens = 8
  return c
