"""DPO config: `--config=configs/dpo.py[:PRESET]`, with `--init=WORKDIR`.

The policy (shapes, params, tokenizer) and the frozen reference both come from the init
workdir (an SFT or pretraining run); this config sets the preference data, the loss
(DPO's sigmoid, Rafailov et al. 2023, or IPO, Azar et al. 2023), β and the schedule.

Presets:
  hh     (default) hh-rlhf harmless-base pairs from ../shared/data/hh-rlhf, 10 % of the
         prompts held out, 300 steps of 16 pairs × 256 tokens, β = 0.1 (Rafailov et al.)
  jsonl  your own `{"prompt", "chosen", "rejected"}` lines: set --config.data.path
  test   seconds, for tests
"""
import ml_collections

PRESETS = {
    'hh': dict(source='hh_rlhf', steps=300, batch=16, seq_len=256, lr=1e-5, warmup=30,
               checkpoint_every=100, eval_every=100),
    'jsonl': dict(source='jsonl', steps=300, batch=16, seq_len=256, lr=1e-5, warmup=30,
                  checkpoint_every=100, eval_every=100),
    'test': dict(source='jsonl', steps=4, batch=8, seq_len=64, lr=1e-3, warmup=1,
                 checkpoint_every=100, eval_every=0),
}


def get_config(arg: str = 'hh') -> ml_collections.ConfigDict:
  preset = arg or 'hh'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.init = ''  # an SFT (or pretraining) workdir; or pass --init=...

  c.data = ml_collections.ConfigDict()
  c.data.source = p['source']  # 'hh_rlhf' | 'jsonl'
  c.data.path = ''
  c.data.on_error = 'raise'  # malformed JSONL lines: 'raise' or 'skip'
  c.data.heldout_fraction = 0.1  # of the distinct prompts
  c.data.max_pairs = 0  # use only the first N pairs read (0: all)
  c.data.seq_len = p['seq_len']  # prompt + reply, cut from the left; <= the model's max_len
  c.data.batch_size = p['batch']  # pairs per step (2× sequences)

  c.dpo = ml_collections.ConfigDict()
  c.dpo.loss = 'sigmoid'  # 'sigmoid' (DPO) | 'ipo'
  c.dpo.beta = 0.1  # β (IPO: τ)

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=p['lr'], warmup_steps=p['warmup'], total_steps=p['steps'],
      final_lr_fraction=0.1, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0))

  c.train = ml_collections.ConfigDict()
  c.train.steps = p['steps']
  c.optimizer.total_steps = c.train.get_ref('steps')
  c.train.log_every = 10
  c.train.eval_every = p['eval_every']  # held-out accuracy every N steps (0: only at the end)
  c.train.checkpoint_every = p['checkpoint_every']
  c.train.keep_checkpoints = 2
  c.train.max_minutes = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32  # pairs per log-prob batch (reference and held-out)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, 1, 1)
  return c
