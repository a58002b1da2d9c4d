"""RLHF config: `--config=configs/rlhf.py[:PRESET]`, with `--init=WORKDIR`.

The policy (shapes, params, tokenizer) comes from the init workdir (an SFT or
pretraining run); this config sets the task, the gold reward, the proxy reward model's
data and training (`reward_model`, a configs/reward_model.py config), PPO and the
evaluation.

Presets:
  default  positive continuations (Ziegler et al. 2019): the first 4-8 words of sentences
           of held-out State of the Union addresses, continued by 24 tokens; gold reward
           = VADER sentiment, proxy = a reward model trained on gold-labelled pairs of the
           init policy's samples; PPO (GAE, adaptive KL) against the proxy; best-of-n;
           sized for ~20-30 min on 2 CPU cores with the tiny model
  grpo     the default with GRPO advantages (groups of 4, no value model)
  rloo     the default with RLOO advantages (groups of 4, leave-one-out baseline, the
           sequence KL in the reward; Ahmadian et al. 2024)
  dr_grpo  the default with Dr. GRPO advantages (groups of 4, no std, no length
           normalisation; Liu et al. 2025)
  hh       hh-rlhf dialogue prompts through the chat template, the reward model of an
           hh-rlhf run of experiments.reward_model (`reward_model_workdir`; trained here
           with configs/reward_model.py:hh when empty); no gold reward
  test     seconds, for tests
"""
import ml_collections

from configs import reward_model as reward_model_config

PRESETS = {
    'default': dict(task='continuation', iterations=48, batch=64, minibatches=2, epochs=4,
                    rm_prompts=2400, pairs_per_prompt=2, eval_prompts=128, eval_every=6,
                    checkpoint_every=6, rm_steps=200, rm_batch=32, max_new_tokens=24,
                    max_prompt_tokens=16),
    'grpo': dict(task='continuation', iterations=48, batch=64, minibatches=2, epochs=4,
                 rm_prompts=2400, pairs_per_prompt=2, eval_prompts=128, eval_every=6,
                 checkpoint_every=6, rm_steps=200, rm_batch=32, max_new_tokens=24,
                 max_prompt_tokens=16, advantage='grpo', group_size=4),
    **{name: dict(task='continuation', iterations=48, batch=64, minibatches=2, epochs=4,
                  rm_prompts=2400, pairs_per_prompt=2, eval_prompts=128, eval_every=6,
                  checkpoint_every=6, rm_steps=200, rm_batch=32, max_new_tokens=24,
                  max_prompt_tokens=16, advantage=name, group_size=4)
       for name in ('rloo', 'dr_grpo')},
    'hh': dict(task='hh', iterations=100, batch=16, minibatches=2, epochs=4, rm_prompts=0,
               eval_prompts=64, eval_every=20, checkpoint_every=10, rm_steps=300, rm_batch=16,
               max_new_tokens=64, max_prompt_tokens=192),
    'test': dict(task='continuation', iterations=4, batch=8, minibatches=2, epochs=2,
                 rm_prompts=48, eval_prompts=8, eval_every=2, checkpoint_every=2, rm_steps=6,
                 rm_batch=8, max_new_tokens=6, max_prompt_tokens=12),
}


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  preset = arg or 'default'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.init = ''  # an SFT or pretraining workdir (or pass --init=...)

  c.task = p['task']  # 'continuation' (raw text, SOTU prompts) | 'hh' (chat template)
  c.data = ml_collections.ConfigDict()
  c.data.corpus = 'sotu'  # continuation: documents whose held-out split gives the prompts
  # continuation: the validation split of the init's pretraining (its fraction and seed
  # when the init config has them, else these).
  c.data.validation_fraction = 0.05
  c.data.min_words = 4  # a prompt is the first k words of a sentence, k uniform in
  c.data.max_words = 8  # [min_words, max_words]
  c.data.min_sentence_words = 8  # sentences shorter than this give no prompt
  c.data.max_prompt_tokens = p['max_prompt_tokens']  # longer prompts are skipped (hh: cut)
  c.data.hh_path = ''  # hh: '' = ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
  c.data.eval_prompts = p['eval_prompts']  # the fixed held-out evaluation prompts

  # Gold reward: 'vader' (VADER compound sentiment of the continuation; measured, never
  # optimised) or 'none'.
  c.gold = 'none' if p['task'] == 'hh' else 'vader'

  # The proxy reward model.
  # '' : train one in WORKDIR/reward_model (continuation: on gold-labelled pairs of the
  # init policy's samples; hh: on hh-rlhf); else an experiments.reward_model workdir.
  c.reward_model_workdir = ''
  # Score every response as if it ended with the stop token (appended when the policy did
  # not emit it): the reward model always reads its score at the same token, on its pairs
  # and in PPO alike (hh: the end_of_turn its training dialogues end with).
  c.score_with_stop = True
  c.pairs = ml_collections.ConfigDict()
  c.pairs.num_prompts = p['rm_prompts']  # training prompts sampled for the RM's pairs
  c.pairs.pairs_per_prompt = p.get('pairs_per_prompt', 1)  # k: 2k samples per prompt, paired
  # disjointly (2 pairs per prompt: 0.71 held-out accuracy where 1 gave 0.63, tiny model)
  c.pairs.min_gap = 0.05  # |gold(a) - gold(b)| below this: a near-tie, skipped
  c.pairs.heldout_fraction = 0.2  # of the prompts (all pairs of a prompt on one side)
  c.reward_model = reward_model_config.get_config('hh' if p['task'] == 'hh' else 'jsonl')
  rm = c.reward_model
  rm.train.steps = p['rm_steps']
  rm.data.batch_size = p['rm_batch']
  rm.optimizer.warmup_steps = max(1, p['rm_steps'] // 10)
  if p['task'] == 'continuation':
    rm.data.seq_len = p['max_prompt_tokens'] + p['max_new_tokens'] + 1  # + the stop token
    rm.optimizer.learning_rate = 2e-4
    rm.eval.before = True

  c.ppo = ml_collections.ConfigDict(dict(
      iterations=p['iterations'],
      batch_size=p['batch'],  # rows per iteration (group estimators: prompts × group_size)
      # Adaptive KL (Ziegler et al.): β moves by up to ±0.2·batch/horizon per iteration (±5 %
      # here), so it can catch up within the run (horizon 1000 let KL overshoot a 4-nat target
      # to 14).
      beta=0.1, adaptive_kl=True, kl_target=6.0, kl_horizon=250.0,
      gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2, value_coef=0.1, entropy_coef=0.0,
      epochs=p['epochs'], minibatches=p['minibatches'],
      max_new_tokens=p['max_new_tokens'], temperature=1.0,
      # continuation: eos may end a continuation at no cost; hh: a reply that never ends
      # its turn is penalised.
      no_eos_penalty=1.0 if p['task'] == 'hh' else 0.0,
      advantage=p.get('advantage', 'gae'), group_size=p.get('group_size', 1),
      whiten_advantages=True,
      policy_lr=3e-5, value_lr=1e-4, grad_clip=1.0))

  c.eval = ml_collections.ConfigDict()
  c.eval.every = p['eval_every']  # iterations between evaluations (and at 0 and the end)
  c.eval.best_of_n = (1, 2, 4, 8, 16)
  c.eval.num_samples = 6  # sample continuations shown before / after

  # (data, fsdp, tensor): the PPO iteration and the proxy reward model trained here run
  # on it; with several processes it must use every device (e.g. (2, 2, 2) for 2 × 4).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, 1, 1)
  c.checkpoint_every = p['checkpoint_every']
  # Wall-clock cap of the PPO loop (0: none); a capped run still evaluates and reports.
  c.max_minutes = 0.0
  c.keep_checkpoints = 2
  # XLA's backend optimisation and CPU fusion emitters off: ~4x faster compiles, slower
  # programs (tests).
  c.fast_compile = preset == 'test'
  return c
