"""Parameter and FLOP accounting.

Conventions (the answer depends on them, so every report names one). T is the context
length, L the number of layers, d_attn = heads × head dim, V the vocabulary:
  '6N'         6 · non-embedding params per trained token (Kaplan et al. 2020, C ≈ 6ND);
  '6N+attn'    Kaplan et al. 2020 eq. 2.2: forward 2N + 2·L·T·d_attn, training 3 × forward,
               so 6N + 6·L·T·d_attn, N non-embedding;
  'chinchilla' the full forward count of Hoffmann et al. 2022 appendix F (embeddings,
               QKV, logits, softmax, attention × V, output projection, FFN, final
               logits), backward = 2 × forward;
  'palm'       6 · (every matmul weight, the LM head included) + 12·L·T·d_attn (Chowdhery
               et al. 2022 app. B; nanoGPT's MFU): the attention term counts both T×T
               products without the causal saving. The GPT `bench` shapes' 89.7 MFLOP per
               token (STACK_NOTES) is this count.
Each convention goes with a parameter count for scaling fits (`scaling_params`): Kaplan's
non-embedding N for '6N' and '6N+attn', Hoffmann's total N for 'chinchilla' and 'palm'.
"""
from research.model import TransformerConfig

CONVENTIONS = ('6N', '6N+attn', 'chinchilla', 'palm')
# Which parameter count each convention's N is (the scaling fits use it).
CONVENTION_PARAMS = {'6N': 'non_embedding', '6N+attn': 'non_embedding',
                     'chinchilla': 'total', 'palm': 'total'}


def _check(convention):
  if convention not in CONVENTIONS:
    raise ValueError(f'FLOP convention {convention!r}: expected one of {", ".join(CONVENTIONS)}')


def param_counts(cfg: TransformerConfig) -> dict:
  """total, non_embedding (Kaplan), embedding (+ an untied head) and per_layer counts."""
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


def scaling_params(cfg: TransformerConfig, convention: str) -> int:
  """The N that goes with `convention` (see CONVENTION_PARAMS)."""
  _check(convention)
  return param_counts(cfg)[CONVENTION_PARAMS[convention]]


def matmul_params(cfg: TransformerConfig, include_head=True) -> int:
  """Parameters that take part in a matmul per token (no norms, no embedding lookup)."""
  d, h = cfg.d_model, cfg.dim_per_head
  attn = d * cfg.num_heads * h * 2 + d * cfg.kv_heads * h * 2
  mlp = d * cfg.hidden_dim * (3 if cfg.mlp == 'swiglu' else 2)
  return cfg.num_layers * (attn + mlp) + (cfg.vocab_size * d if include_head else 0)


def forward_flops_chinchilla(cfg: TransformerConfig, seq_len: int) -> float:
  """Forward FLOPs per token, Hoffmann et al. 2022 appendix F (with GQA key/values).

  The appendix counts per sequence; every term here is that divided by seq_len.
  """
  d, h, n, k = cfg.d_model, cfg.dim_per_head, cfg.num_heads, cfg.kv_heads
  v, t, f = cfg.vocab_size, seq_len, cfg.hidden_dim
  embeddings = 2 * d * v  # the lookup counted as a one-hot matmul, as the appendix does
  qkv = 2 * d * (n + 2 * k) * h
  logits = 2 * t * n * h
  softmax = 3 * n * t
  reduction = 2 * t * n * h
  project = 2 * n * h * d
  ffn = 2 * d * f * (3 if cfg.mlp == 'swiglu' else 2)
  final = 2 * d * v
  return embeddings + cfg.num_layers * (qkv + logits + softmax + reduction + project + ffn) + final


def train_flops_per_token(cfg: TransformerConfig, seq_len: int, convention='6N+attn') -> float:
  """Training FLOPs per token (forward + backward) under a named convention."""
  _check(convention)
  d_attn = cfg.num_heads * cfg.dim_per_head
  if convention == '6N':
    return 6.0 * param_counts(cfg)['non_embedding']
  if convention == '6N+attn':
    return 6.0 * param_counts(cfg)['non_embedding'] + 6.0 * cfg.num_layers * seq_len * d_attn
  if convention == 'chinchilla':
    return 3.0 * forward_flops_chinchilla(cfg, seq_len)
  return 6.0 * matmul_params(cfg, include_head=True) + 12.0 * cfg.num_layers * seq_len * d_attn
