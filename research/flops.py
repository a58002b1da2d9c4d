"""Parameter and FLOP accounting.

Conventions (the answer depends on them, so every report names one):
  '6N'        6 · non-embedding params per trained token (Kaplan et al. 2020, C ≈ 6ND);
  '6N+attn'   6N plus the attention scores and values, 6 · 2·L·T·d_attn per token
              (Kaplan's 2·n_layer·n_ctx·d_attn forward term, ×3 for training);
  'chinchilla' the full forward count of Hoffmann et al. 2022 appendix F (embeddings,
              QKV, logits, softmax, attention × V, output projection, FFN, final
              logits), backward = 2 × forward.
The benchmark figure for the GPT `bench` shapes (89.7 MFLOP/token) is 6N + 12·L·d·T with
N counting the tied LM head as a matmul: `train_flops_per_token(cfg, '6N+attn', include_head=True)`.
"""
from research.model import TransformerConfig


def param_counts(cfg: TransformerConfig) -> dict:
  d, h = cfg.d_model, cfg.dim_per_head
  attn = d * cfg.num_heads * h * 2 + d * cfg.kv_heads * h * 2
  mlp = d * cfg.hidden_dim * (3 if cfg.mlp == 'swiglu' else 2)
  norms = d * (2 if cfg.norm == 'rmsnorm' else 4)
  per_layer = attn + mlp + norms
  embedding = cfg.vocab_size * d + (cfg.max_len * d if cfg.position == 'learned' else 0)
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  final = d * (1 if cfg.norm == 'rmsnorm' else 2) + (d if cfg.scalar_head else 0)
  non_embedding = cfg.num_layers * per_layer + final
  return dict(total=non_embedding + embedding + head, non_embedding=non_embedding,
              embedding=embedding + head, per_layer=per_layer)


def matmul_params(cfg: TransformerConfig, include_head=True) -> int:
  """Parameters that take part in a matmul per token (no norms, no embedding lookup)."""
  d, h = cfg.d_model, cfg.dim_per_head
  attn = d * cfg.num_heads * h * 2 + d * cfg.kv_heads * h * 2
  mlp = d * cfg.hidden_dim * (3 if cfg.mlp == 'swiglu' else 2)
  return cfg.num_layers * (attn + mlp) + (cfg.vocab_size * d if include_head else 0)


def forward_flops_chinchilla(cfg: TransformerConfig, seq_len: int) -> float:
  """Forward FLOPs per token, Hoffmann et al. 2022 appendix F (with GQA key/values)."""
  d, h, n, k = cfg.d_model, cfg.dim_per_head, cfg.num_heads, cfg.kv_heads
  v, t, f = cfg.vocab_size, seq_len, cfg.hidden_dim
  embeddings = 2 * d * v
  qkv = 2 * d * (n + 2 * k) * h
  logits = 2 * t * n * h
  softmax = 3 * n * t
  reduction = 2 * t * n * h
  project = 2 * n * h * d
  ffn = 2 * d * f * (3 if cfg.mlp == 'swiglu' else 2)
  final = 2 * d * v
  return embeddings + cfg.num_layers * (qkv + logits + softmax + reduction + project + ffn) + final


def train_flops_per_token(cfg: TransformerConfig, seq_len: int, convention='6N+attn',
                          include_head=True) -> float:
  """Training FLOPs per token (forward + backward) under a named convention."""
  if convention == '6N':
    return 6.0 * param_counts(cfg)['non_embedding']
  if convention == '6N+attn':
    attn = 6 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.dim_per_head
    return 6.0 * matmul_params(cfg, include_head) + attn
  if convention == 'chinchilla':
    return 3.0 * forward_flops_chinchilla(cfg, seq_len)
  raise ValueError(f'FLOP convention {convention!r}: expected 6N, 6N+attn or chinchilla')
