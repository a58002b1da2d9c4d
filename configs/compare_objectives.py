"""Objective comparison study: `--config=configs/compare_objectives.py[:PRESET]`.

Presets:
  cpu (default)  every arm × 3 seeds in under an hour on 2 CPU cores: a 2-layer d=64
                 model (0.23M params, 0.1M non-embedding), vocab 2048, T=64, batch 32,
                 400 steps (0.82M tokens seen per run); 40 causal adaptation steps, 80
                 fine-tuning steps, 300 PIQA examples. Per-run times are in the report.
  gpu            the same study at 12 layers, d 512, vocab 8192, T 256, batch 64, 5000
                 steps (82M tokens per run), bfloat16 dots, full PIQA.
Every arm shares `pretrain` (architecture, data, optimiser, steps, seed per run); an arm
only sets objective fields (`arm_objectives`). Override any field, e.g.
`--config.seeds='(0,)' --config.arms="('causal','masked15')" --config.pretrain.train.steps=50`.
"""
import ml_collections

from configs import pretrain as pretrain_config

ARM_OBJECTIVES = {
    'causal': dict(name='causal'),
    'masked15': dict(name='masked', mask_rate=0.15),
    'masked40': dict(name='masked', mask_rate=0.40),  # Wettig et al. 2023
    'prefix': dict(name='prefix'),
    'span': dict(name='span', noise_rate=0.15, mean_span=3.0),
    'hybrid': dict(name='hybrid', mask_rate=0.15, causal_fraction=0.5),
    'ul2': dict(name='ul2', mix_r=0.4, mix_s=0.2, mix_x=0.4, r_noise_rate=0.15,
                r_mean_span=3.0, x_noise_rate=0.5, x_mean_span=32.0),  # Tay et al. 2022
}

PRESETS = {
    'cpu': dict(d_model=64, num_layers=2, num_heads=2, vocab=2048, seq_len=64, batch=32,
                steps=400, lr=3e-3, warmup=40, eval_every=100, compute_dtype='float32',
                adapt_steps=40, loss_batches=16, pll_passages=24, era_len=64,
                era_train=160, era_test=64, ft_steps=80, piqa_examples=300, piqa_len=64),
    'gpu': dict(d_model=512, num_layers=12, num_heads=8, vocab=8192, seq_len=256, batch=64,
                steps=5000, lr=1e-3, warmup=300, eval_every=500, compute_dtype='bfloat16',
                adapt_steps=500, loss_batches=64, pll_passages=128, era_len=128,
                era_train=1000, era_test=250, ft_steps=600, piqa_examples=0, piqa_len=128),
}


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  preset = arg or 'cpu'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seeds = (0, 1, 2)
  c.arms = tuple(ARM_OBJECTIVES)
  c.arm_objectives = ml_collections.ConfigDict(ARM_OBJECTIVES)

  # The pretraining config every arm shares (configs/pretrain.py fields).
  pc = pretrain_config.get_config('tiny')
  pc.preset = f'compare_objectives:{preset}'
  pc.data.seq_len = p['seq_len']
  pc.data.batch_size = p['batch']
  # A validation split bigger than pretraining's default: it also supplies the era
  # task's test speeches. It is fixed across seeds (split_seed), so every run holds
  # out the same speeches.
  pc.data.validation_fraction = 0.2
  pc.data.split_seed = 0
  pc.tokenizer.vocab_size = p['vocab']
  pc.model.update(d_model=p['d_model'], num_layers=p['num_layers'], num_heads=p['num_heads'],
                  compute_dtype=p['compute_dtype'])
  pc.optimizer.learning_rate = p['lr']
  pc.optimizer.warmup_steps = p['warmup']
  pc.train.steps = p['steps']
  pc.train.log_every = 50
  pc.train.eval_every = p['eval_every']
  pc.train.eval_batches = 8
  # The final validation figure over 32 batches, not pretrain's whole split: the 20 %
  # split would cost every run about half its training time again.
  pc.train.final_eval_batches = 32
  pc.train.checkpoint_every = p['steps'] // 2
  pc.train.keep_checkpoints = 1
  pc.train.num_samples = 0
  c.pretrain = pc

  c.eval = ml_collections.ConfigDict()
  c.eval.loss_batches = p['loss_batches']  # held-out batches (of pretrain batch size)
  c.eval.adapt_steps = p['adapt_steps']  # causal adaptation budget, every arm alike
  c.eval.adapt_learning_rate = p['lr'] / 3
  c.eval.cloze_mask_rate = 0.15
  c.eval.pll_passages = p['pll_passages']  # held-out passages of data.seq_len tokens
  c.eval.batch_size = 64  # rows per forward pass in PLL / PIQA scoring

  c.era = ml_collections.ConfigDict()
  c.era.num_bins = 4
  c.era.passage_len = p['era_len']
  c.era.train_per_class = p['era_train']
  c.era.test_per_class = p['era_test']
  c.era.steps = p['ft_steps']  # the same budget for fine-tuning and the probe
  c.era.batch_size = 32
  c.era.finetune_learning_rate = 1e-3
  c.era.probe_learning_rate = 1e-2
  # 'native': each arm attends as it was trained (causal arm causal, the others
  # bidirectional); or 'bidirectional' / 'causal' for every arm.
  c.era.attention = 'native'

  c.piqa = ml_collections.ConfigDict()
  c.piqa.path = '../shared/data/piqa'  # skipped cleanly when absent
  c.piqa.max_examples = p['piqa_examples']  # 0: all 1838
  c.piqa.max_len = p['piqa_len']
  return c
