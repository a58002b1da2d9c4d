"""Our train step against the same GPT written plainly in PyTorch, in one process.

  python -m benchmarks.peer_torch [--reps=5] [--dtypes=float32,bfloat16] [--torch_threads=1,2]

The peer (`PeerGPT`) is the `bench` model (configs/pretrain.py: 6 layers, d 384, 6 heads,
T 256, vocab 8192, batch 8) as a researcher would write it in PyTorch, nanoGPT style:
pre-norm RMSNorm (eps 1e-6), one fused qkv Linear, rotary embeddings (rotate-half),
`F.scaled_dot_product_attention(is_causal=True)`, a GELU (tanh) 4x MLP, no biases, tied
embeddings, cross-entropy on the full logits; eager mode, AdamW(fused=True) with the same
hyperparameters and gradient clipping at 1.0 as ours. Its step is
zero_grad -> forward -> backward -> clip -> AdamW step.

Ours is `benchmarks.throughput.build`'s jitted train step (causal objective, AdamW,
clipping). All configurations (ours and the peer's, each dtype, each thread count)
alternate call by call in one round robin, `--reps` times after warm-up; printed:
medians as tokens/s (batch*T per step) and ours/peer.
bfloat16 is `model.compute_dtype='bfloat16'` for ours (bf16 dot operands, float32
accumulation, float32 params) and `torch.autocast('cpu', torch.bfloat16)` for the
peer (bf16 Linear / SDPA, float32 params). The last lines compare each side's best
configuration. The machine is shared: only same-run ratios mean anything.

Torch threads: the peer runs at each of --torch_threads (default 1 and all CPUs), set
with torch.set_num_threads before each of its calls, and its best is taken. On a loaded
2-core host torch's OpenMP at 2 threads can be many times slower than at 1 (spinning
barriers waiting on a descheduled thread: a tiny HF generate took 18 s at 2 threads and
0.55 s at 1 on 2026-11-30, load average 10), so a single thread count would not be the
peer's best configuration.
"""
import argparse
import math
import os
import statistics
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common as bench
from benchmarks import throughput
from configs import pretrain as pretrain_config
from experiments import common


class RMSNorm(nn.Module):
  def __init__(self, d, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(d))

  def forward(self, x):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return x32.type_as(x) * self.weight


def rope_tables(t, h, theta=10_000.0):
  """(cos, sin) of shape (T, H) for the rotate-half form, float32."""
  freq = theta ** (-torch.arange(0, h // 2, dtype=torch.float32) / (h // 2))
  angle = torch.arange(t, dtype=torch.float32)[:, None] * freq[None]
  return torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)


def apply_rope(x, cos, sin):
  """x: (B, N, T, H)."""
  x1, x2 = x.chunk(2, dim=-1)
  return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
  def __init__(self, d, n_heads):
    super().__init__()
    self.n_heads = n_heads
    self.ln_1, self.ln_2 = RMSNorm(d), RMSNorm(d)
    self.c_attn = nn.Linear(d, 3 * d, bias=False)
    self.c_proj = nn.Linear(d, d, bias=False)
    self.c_fc = nn.Linear(d, 4 * d, bias=False)
    self.mlp_proj = nn.Linear(4 * d, d, bias=False)

  def forward(self, x, cos, sin):
    b, t, d = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
    q, k, v = (a.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for a in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
    return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate='tanh'))


class PeerGPT(nn.Module):
  """tokens (B, T) int64 -> logits (B, T, V); loss(tokens, targets) -> scalar."""

  def __init__(self, vocab, d, n_layers, n_heads, seq_len, init_std=0.02):
    super().__init__()
    self.wte = nn.Embedding(vocab, d)
    self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
    self.ln_f = RMSNorm(d)
    cos, sin = rope_tables(seq_len, d // n_heads)
    self.register_buffer('cos', cos, persistent=False)
    self.register_buffer('sin', sin, persistent=False)
    for name, p in self.named_parameters():
      if p.dim() == 2:
        out_proj = name.endswith(('c_proj.weight', 'mlp_proj.weight'))  # GPT-2 scaled init
        nn.init.normal_(p, std=init_std / math.sqrt(2 * n_layers) if out_proj else init_std)

  def forward(self, tokens):
    x = self.wte(tokens)
    for block in self.blocks:
      x = block(x, self.cos, self.sin)
    return self.ln_f(x) @ self.wte.weight.T  # tied head

  def loss(self, tokens, targets):
    logits = self(tokens)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def peer_step_fn(config, dtype: str, seed=0):
  """A zero-argument function running one peer train step on a fixed random batch."""
  torch.manual_seed(seed)
  m, d, o = config.model, config.data, config.optimizer
  model = PeerGPT(m.vocab_size, m.d_model, m.num_layers, m.num_heads, d.seq_len)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=o.weight_decay),
                           dict(params=no_decay, weight_decay=0.0)],
                          lr=o.learning_rate, betas=(o.b1, o.b2), fused=True)
  rng = np.random.default_rng(seed)
  tokens = torch.from_numpy(rng.integers(113, m.vocab_size, (d.batch_size, d.seq_len + 1)))
  x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = model.loss(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    opt.step()
    return loss.item()
  return step


def ours_step_fn(dtype: str):
  """A zero-argument function running one of our jitted train steps (bench shapes)."""
  _, _, _, state, batch, _, step = throughput.build(dtype)
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch, jax.random.key(0))
    return float(metrics['loss'])
  return run


def with_threads(fn, n: int):
  def run():
    torch.set_num_threads(n)
    return fn()
  return run


def alternate(fns: dict, reps: int, warmup: int = 2) -> dict:
  """Median seconds per call of each zero-argument fn, calls interleaved."""
  for f in fns.values():
    for _ in range(warmup):
      f()
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def main():
  parser = bench.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reps', type=bench.positive_int, default=5)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--torch_threads', default=f'1,{os.cpu_count()}')
  args = parser.parse_args()
  try:
    threads = sorted({bench.positive_int(n) for n in args.torch_threads.split(',')})
  except argparse.ArgumentTypeError as e:
    parser.error(f'--torch_threads={args.torch_threads}: {e}')
  if set(args.dtypes.split(',')) - {'float32', 'bfloat16'}:
    parser.error(f'--dtypes={args.dtypes}: expected a comma list of float32, bfloat16')
  config = pretrain_config.get_config('bench')
  tokens = config.data.batch_size * config.data.seq_len
  flags = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
  isa = [f for f in ('amx_bf16', 'avx512_bf16', 'avx512f', 'avx2') if f in flags]
  print(f'bench shapes, {tokens} tokens per step; torch {torch.__version__} '
        f'(threads {threads}), jax {jax.__version__}; CPU flags {isa}; '
        f'{args.reps} alternating reps per dtype')
  # Every configuration in one round robin, so that load changes on the shared host hit
  # all alike and the best-vs-best ratio is a same-time comparison too.
  dtypes = args.dtypes.split(',')
  fns = {}
  for dtype in dtypes:
    fns[('ours', dtype, 0)] = ours_step_fn(dtype)
    peer = peer_step_fn(config, dtype)
    for n in threads:
      fns[('peer', dtype, n)] = with_threads(peer, n)
  rate = {k: tokens / v for k, v in alternate(fns, args.reps).items()}
  best = {}
  for dtype in dtypes:
    n = max(threads, key=lambda n: rate[('peer', dtype, n)])
    o, p = rate[('ours', dtype, 0)], rate[('peer', dtype, n)]
    best[('ours', dtype)], best[('peer', dtype)] = o, p
    each = ', '.join(f'{n} thread(s) {rate[("peer", dtype, n)]:,.0f}' for n in threads)
    print(f'{dtype:9s} ours {o:8,.0f} tokens/s   peer {p:8,.0f} tokens/s   '
          f'ours/peer {o / p:.2f}   (peer at {each})')
  (_, o_dtype), o = max(((k, v) for k, v in best.items() if k[0] == 'ours'), key=lambda kv: kv[1])
  (_, p_dtype), p = max(((k, v) for k, v in best.items() if k[0] == 'peer'), key=lambda kv: kv[1])
  print(f'best: ours {o_dtype} {o:,.0f} tokens/s, peer {p_dtype} {p:,.0f} tokens/s; '
        f'ours best / peer best {o / p:.2f}')


if __name__ == '__main__':
  common.exit_on_user_error(main)()
