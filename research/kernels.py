"""Fast kernels for the language model on XLA:CPU: dense, attention, tied LM-head loss.

Public API (float32 in, float32 out; `compute_dtype` ('float32' / 'bfloat16', a dtype or
its name) is the dtype of the dot operands, accumulation is always float32):

  dense(x_NxD, w_DxF, compute_dtype=f32) -> f32 NxF          custom VJP
  dense_reference(x_NxD, w_DxF, compute_dtype=f32)           plain jnp.dot, autodiff
  attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, prefix_BxT, *,
            compute_dtype=f32, impl='auto'|'blocked'|'reference', block_q=None,
            q_positions=None, kv_positions=None, kv_segment_ids=None, kv_prefix=None)
            -> f32 BxTxNxH                                    blocked, custom VJP
  attention_reference(q, k, v, segment_ids, prefix, *, compute_dtype=f32,
                      q_positions=None, kv_positions=None, kv_segment_ids=None,
                      kv_prefix=None)                         einsum + mask + softmax
  attention_mask(segment_ids_BxT, prefix_BxT, *, q_positions=None, kv_positions=None,
                 kv_segment_ids=None, kv_prefix=None) -> bool BxTxS
  lm_head_loss(h_NxD, w_VxD, targets_N, weights_N, *, z_loss=0.0, compute_dtype=f32,
               chunk_size=None) -> (loss_sum, z_loss_sum, correct_sum)   fused, chunked
  lm_head_loss_reference(h, w, targets, weights, *, z_loss=0.0, compute_dtype=f32)
  BF16_DOTS, bf16_dots_native(): how bf16 dots are executed (see below).

Each function's docstring says why it is built the way it is; `python -m
benchmarks.kernels` measures them against the plain versions and a float32 2048^2 dot.

What the measurements on the development machine showed (jaxlib 0.10.2; details and
numbers in the benchmark's output and the commit message):

* The machine these kernels were written on is an AVX2-only AMD EPYC (Zen 3 class: no
  AVX-512, no AMX, no avx512_bf16), not the AMX machine STACK_NOTES describes.  There a
  float32 2048^2 dot runs at 110-140 GFLOP/s on 2 cores when the host is quiet, and a
  bf16 x bf16 -> f32 dot at only ~0.6-0.7x of that (no bf16 arithmetic).  Hence
  BF16_DOTS='auto': on such CPUs bf16 compute rounds the operands to bf16 and runs the
  dots in float32, the same numbers (bf16 products are exact in f32, f32
  accumulation) at float32 speed.  On AMX / avx512_bf16 CPUs, GPUs and TPUs the dots are
  native bf16 and all dots of every kernel's forward and backward compile to YNNPACK
  bf16 x bf16 -> f32 fusions (`python -m benchmarks.kernels --hlo` checks that); the
  plain versions' weight-gradient dots compile to convert + float32 Eigen dots.
* XLA:CPU runs large 2-D dots on YNNPACK with both cores, but a batched dot whose
  matrices are small (attention: one (T x H) x (H x T) per batch element and head, T=256)
  runs there on ONE core at ~0.25-0.45 of a large 2-D dot.  XLA only gives YNNPACK dots
  whose left operand contracts its minor axis; a batched dot whose left operand contracts
  a non-minor axis goes to Eigen, which runs these on both cores at ~0.6 (measured side
  by side at the attention shapes).  The blocked attention is therefore written in a
  keys x queries orientation in which every dot is of that kind, and elementwise passes
  over score-sized arrays (memory bound, ~13 GB/s) are kept few: blocks, no stored
  probabilities, one mask select per block.
* On an AVX512-BF16 EPYC (no AMX; 2026-11-30): 2-D bf16 x bf16 -> f32 dots run on
  YNNPACK in bf16.  A *batched* bf16 dot stays bf16 only if YNNPACK can take it (XLA's
  OperandUpcaster / FloatNormalization ask IsDotSupportedByYnn, before layout
  assignment): the left operand contracts its minor axis and every operand has a
  row-major layout.  Otherwise XLA upcasts it to a float32 dot, silently.  Two things
  broke that for the keys x queries kernel: a `jnp.moveaxis` in front of the dot is
  folded back into its dimension numbers, and a jnp transpose reaches XLA as a layout
  change (e.g. {3,1,2,0}, a free bitcast) that elementwise ops and optimization barriers
  keep, so even a "materialised" transpose behind a barrier was upcast.  With native
  bf16 dots on XLA:CPU the blocked attention therefore runs in queries x keys
  orientation (`_qk_fwd_core` / `_qk_bwd_core`), where 5 of its 7 dots need no
  transpose and the other two (dK, dV) get a row-major copy from `_row_major`
  (reshape -> barrier -> reshape).  All of its dots are then bf16 on YNNPACK; fwd+bwd
  at the bench shapes went from 240 ms (18 of 24 dots upcast, as slow as float32) to
  80 ms (same process, medians, heavily loaded host).  A bf16 dot that XLA rewrites
  after that upcast decision is not upcast and fails at run
  time ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"): the LM
  head's dW transpose, folded into its dot when there is one chunk, did that until an
  optimization barrier kept them apart (see `_head_forward`).
* Tried and dropped: a backward pass in transposed-score orientation (no gain); keeping
  the forward's probabilities for the backward instead of recomputing them (no gain at
  T=256: the cond-padded stores cost what the saved matmul gains); block_q 32 / 128 /
  256 at T=256 (64 is best; 128 at T >= 1024); argmax in the loss (a variadic reduce,
  ~7x slower than max on XLA:CPU: "correct" is target logit == row max instead).
* XLA flags (whole-kernel fwd+bwd vs the dot, same process; noisy, host load 3-8):
  `--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK off: Eigen dots) makes the batched
  attention dots multi-threaded (attention fwd+bwd ~0.45-0.54 of the dot instead of
  ~0.31-0.36) but the 2048^2 dot itself ~35% slower, so the step as a whole does not
  gain; `...=individual_dot` (no elementwise fusion into YNNPACK) was no better;
  `--xla_cpu_enable_fast_math=true` and `--xla_cpu_use_xnnpack=true` made no
  measurable difference.  The kernels need no flags.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
BF16 = jnp.bfloat16

# --------------------------------------------------------------------------------------
# bf16 dots: native, or emulated on float32 dots.
# --------------------------------------------------------------------------------------

#: How a bf16 (or other narrow float) "compute_dtype" dot is executed:
#:   'native'  - the operands are cast to the compute dtype and the dot is a
#:               bf16 x bf16 -> f32 dot (the fast path on CPUs with AVX512_BF16/AMX, GPUs, TPUs);
#:   'f32'     - the operands are rounded to the compute dtype and then widened back to
#:               float32, so the dot runs on the float32 kernels.  Products of two bf16
#:               numbers are exact in float32 and accumulation is float32 in both
#:               cases, so the two agree up to summation order; on CPUs without bf16
#:               arithmetic (e.g. AVX2-only Zen 3) XLA's bf16 dot is ~0.6x the speed of
#:               the float32 one, so this is what makes bf16 compute not lose there.
#:   'auto'    - 'native' unless the backend is a CPU without avx512_bf16 / amx_bf16.
#: Read at trace time: set it (or the environment variable RESEARCH_BF16_DOTS) before
#: jitting.
BF16_DOTS = os.environ.get("RESEARCH_BF16_DOTS", "auto")


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_arithmetic() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return True  # unknown: assume a modern CPU
  return ("avx512_bf16" in flags) or ("amx_bf16" in flags)


def bf16_dots_native() -> bool:
  """True if narrow-dtype dots run natively (see BF16_DOTS)."""
  mode = BF16_DOTS
  if mode == "native":
    return True
  if mode == "f32":
    return False
  if mode != "auto":
    raise ValueError(f"BF16_DOTS must be 'auto', 'native' or 'f32', got {mode!r}")
  if jax.default_backend() != "cpu":
    return True
  return _cpu_has_bf16_arithmetic()


def _operand(x, compute_dtype):
  """x as a dot operand for `compute_dtype` (float32 accumulation is implied).

  Returns an array of compute_dtype (native) or float32 holding compute_dtype-rounded
  values (emulated).  Residuals saved for a backward pass are produced by this function,
  so in emulated mode they are float32 (the convert back from bf16 would otherwise be
  recomputed at every use).
  """
  compute_dtype = jnp.dtype(compute_dtype)
  if compute_dtype == F32:
    return x.astype(F32)
  if bf16_dots_native():
    return x.astype(compute_dtype)
  return x.astype(compute_dtype).astype(F32)


def _dot(a, b, dims):
  """dot_general with float32 accumulation and output."""
  return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _pad_rows(x, n):
  return x if x.shape[0] == n else jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


_NN = (((1,), (0,)), ((), ()))  # (n,d) x (d,f) -> (n,f)
_NT = (((1,), (1,)), ((), ()))  # (n,f) x (d,f) -> (n,d)


def _dot_tn(a, b):
  """a.T @ b for a: (N, D), b: (N, F) -> (D, F), float32.

  Contracting the leading (row) axis of both operands is the "weight gradient" layout.
  XLA:CPU lowers dot_general contracting ((0,), (0,)) on bf16 operands to
  convert-to-f32 + an f32 dot (off the fast bf16 kernel).  Written as an einsum that
  contracts two axes of the activations reshaped to (2, N/2, .), XLA instead
  transposes one operand into a row-major (D, N) copy and keeps the bf16 dot
  (see STACK_NOTES "Speed on these CPUs").  Odd N gets a zero row appended.
  """
  n = a.shape[0]
  if n % 2:
    a, b, n = _pad_rows(a, n + 1), _pad_rows(b, n + 1), n + 1
  if a.shape[1] > b.shape[1]:
    # XLA materialises the transposed copy of the first operand: make it the smaller
    # one and transpose the (small) result instead.
    return lax.optimization_barrier(_dot_tn(b, a)).T
  a2 = a.reshape(2, n // 2, a.shape[1])
  b2 = b.reshape(2, n // 2, b.shape[1])
  return jnp.einsum("knd,knf->df", a2, b2, preferred_element_type=F32)


# --------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, compute_dtype):
  return _dot(_operand(x, compute_dtype), _operand(w, compute_dtype), _NN)


def _dense_fwd(x, w, compute_dtype):
  xc, wc = _operand(x, compute_dtype), _operand(w, compute_dtype)
  # Zero-size arrays only carry the input dtypes into the backward pass.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return _dot(xc, wc, _NN), (xc, wc, dtypes)


def _dense_bwd(compute_dtype, res, g):
  xc, wc, (xdt, wdt) = res
  gc = _operand(g, compute_dtype)
  dx = _dot(gc, wc, _NT)          # (N,F) x (D,F) -> (N,D): contracting (1,1)
  dw = _dot_tn(xc, gc)            # (N,D)^T x (N,F) -> (D,F)
  return dx.astype(xdt.dtype), dw.astype(wdt.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x, w, compute_dtype=F32):
  """y = x @ w with operands in `compute_dtype` and float32 accumulation.

  Args:
    x: (N, D) activations (any float dtype; the model passes float32 (B*T, D)).
    w: (D, F) weights (float32 params).
    compute_dtype: dtype of the dot operands (float32 or bfloat16).

  Returns:
    (N, F) float32.  Always float32 (the accumulator), whatever compute_dtype: the
    residual stream, GELU and norms are float32 and an elementwise consumer fuses the
    narrowing cast for the next dot anyway.

  Gradients come back in the dtypes of x and w.  The custom VJP keeps every dot of
  the backward pass in a layout XLA:CPU runs on its fast kernels (notably bf16 x bf16 ->
  f32): dx = g @ w.T as dot_general contracting (1, 1), dw = x.T @ g via `_dot_tn`.
  Autodiff of a plain jnp.dot instead produces a ((0,), (0,)) dot for dw, which XLA
  turns into convert + float32 dot for bf16 inputs.
  """
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"dense wants 2-D x and w, got {x.shape} and {w.shape}")
  return _dense(x, w, jnp.dtype(compute_dtype))


def dense_reference(x, w, compute_dtype=F32):
  """Plain version of `dense` (autodiff backward)."""
  return jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype),
                 preferred_element_type=F32)


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------

_MASK_VALUE = -0.7 * float(jnp.finfo(F32).max)  # finite: a fully masked row gives no NaN


def attention_mask(segment_ids, prefix, *, q_positions=None, kv_positions=None,
                   kv_segment_ids=None, kv_prefix=None):
  """Boolean (B, T, S) mask: query i may attend key j.

  Rule: same segment and (pos_j <= pos_i or prefix_j).  prefix all False is causal,
  all True bidirectional, a leading run of True a prefix-LM.  Padding (segment 0)
  attends other padding, so no row is empty.  Positions default to arange (index in
  the row); the kv_* arguments default to the query-side ones (self-attention) and
  exist for decoding against a cache (kv_prefix defaults to all False when kv has a
  different length than q).
  """
  b, t = segment_ids.shape
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  s = kv_segment_ids.shape[1]
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(s), (b, s))
  if kv_prefix is None:
    kv_prefix = prefix if (prefix is not None and prefix.shape[1] == s) else jnp.zeros((b, s), bool)
  same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  visible = (kv_positions[:, None, :] <= q_positions[:, :, None]) | kv_prefix[:, None, :].astype(bool)
  return same & visible


def attention_reference(q, k, v, segment_ids, prefix, *, compute_dtype=F32,
                        q_positions=None, kv_positions=None, kv_segment_ids=None,
                        kv_prefix=None):
  """Plain grouped-query attention: einsum, mask, float32 softmax, einsum.

  q: (B, T, N, H); k, v: (B, S, K, H) with N % K == 0; segment_ids, prefix: (B, T).
  Returns (B, T, N, H) float32.  Scores are scaled by 1/sqrt(H); operands of both
  einsums are cast to compute_dtype with float32 accumulation; softmax is float32.
  See `attention_mask` for the mask rule and the optional decoding arguments.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  mask = attention_mask(segment_ids, prefix, q_positions=q_positions,
                        kv_positions=kv_positions, kv_segment_ids=kv_segment_ids,
                        kv_prefix=kv_prefix)
  qg = q.reshape(b, t, kh, g, h).astype(compute_dtype)
  s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(compute_dtype),
                 preferred_element_type=F32) / math.sqrt(h)
  s = jnp.where(mask[:, None, None], s, _MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bskh->btkgh", p.astype(compute_dtype), v.astype(compute_dtype),
                 preferred_element_type=F32)
  return o.reshape(b, t, n, h)


def _block_ranges(t, block_q):
  """Static query blocks [(start, end)] covering 0..t; the last may be short."""
  return [(s, min(s + block_q, t)) for s in range(0, t, block_q)]


# The blocked kernel works in "keys x queries" orientation: scores are (B, K, L, Q) with
# the keys on the row axis, and every batched dot contracts a non-minor axis of its left
# operand.  XLA:CPU hands such dots to Eigen, which runs these small (64-256 row) batched
# matmuls on both cores at ~0.6 of a large dot; the row-major forms go to YNNPACK, one
# core, ~0.25-0.45 (measured side by side; `python -m benchmarks.kernels`).  Narrow
# dtypes in native mode on XLA:CPU must stay on YNNPACK (XLA upcasts any other batched
# bf16 dot to float32): they take the queries x keys kernel below (`_queries_by_keys`).
_BATCH = ((0, 1), (0, 1))


def _bdot(a, b, a_contract, b_contract):
  """dot_general over batch axes (0, 1) with float32 accumulation."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), _BATCH),
                         preferred_element_type=F32)


def _block_mask_t(seg, prefix, qs, qe, kl, g):
  """(B, 1, kl, (qe-qs)*g) mask, keys x queries: query i (each of its g heads) may
  attend key j < kl.  Same rule as `attention_mask`, for self-attention."""
  kpos = jnp.arange(kl)[:, None]
  qpos = jnp.arange(qs, qe)[None, :]
  same = seg[:, :kl, None] == seg[:, None, qs:qe]
  visible = (kpos <= qpos)[None] | prefix[:, :kl, None]
  mask = (same & visible)[:, None, :, :, None]
  b = seg.shape[0]
  return jnp.broadcast_to(mask, (b, 1, kl, qe - qs, g)).reshape(b, 1, kl, (qe - qs) * g)


def _block_mask_qk(seg, prefix, qs, qe, kl, g):
  """`_block_mask_t` transposed: (B, 1, (qe-qs)*g, kl), queries x keys."""
  kpos = jnp.arange(kl)[None, :]
  qpos = jnp.arange(qs, qe)[:, None]
  same = seg[:, qs:qe, None] == seg[:, None, :kl]
  visible = (kpos <= qpos)[None] | prefix[:, None, :kl]
  mask = (same & visible)[:, None, :, None, :]
  b = seg.shape[0]
  return jnp.broadcast_to(mask, (b, 1, qe - qs, g, kl)).reshape(b, 1, (qe - qs) * g, kl)


def _blocked(t, block_q, prefix, block_fn, combine):
  """combine([block_fn(qs, qe, kl) for each query block [qs, qe)]), kl = the keys it needs.

  Without prefix tokens (causal rows, packed or not) query block [qs, qe) needs keys
  [0, qe) only, which skips (1 - 1/n_blocks)/2 of the work.  A prefix token is
  visible to every query of its segment, so if any row has one (bidirectional,
  prefix-LM) every block takes all t keys: one `lax.cond` over the whole pass.
  """
  def run(causal):
    return combine([block_fn(qs, qe, qe if causal else t) for qs, qe in _block_ranges(t, block_q)])
  return lax.cond(jnp.any(prefix), lambda: run(False), lambda: run(True))


def _sum_key_blocks(pieces, t, block_q, axis=-1):
  """Sum of per-query-block gradients (B, K, H, kl_i) over keys 0..t -> (B, K, H, t)
  (keys on `axis`; the default is the last).

  Key block [ks, ke) gets the pieces that cover it; the result is one concatenation
  (no zero-padding of each piece to t, which cost a full copy per piece).
  """
  out = []
  for ks, ke in _block_ranges(t, block_q):
    keys = (Ellipsis, slice(ks, ke)) if axis == -1 else (slice(None),) * axis + (slice(ks, ke),)
    out.append(sum(p[keys] for p in pieces if p.shape[axis] >= ke))
  return jnp.concatenate(out, axis=axis) if len(out) > 1 else out[0]


def _blocked_fwd_core(qt, k_t, vt, seg, prefix, g, block_q, compute_dtype):
  """Forward over query blocks.

  qt: (B, K, T*G, H) scaled queries (the G heads of a kv head are interleaved rows);
  k_t: (B, K, H, T) keys transposed; vt: (B, K, T, H).  Returns o: (B, K, T*G, H) and
  lse: (B, K, T*G), float32.
  """
  t = vt.shape[2]

  def block(qs, qe, kl):
    s = _bdot(k_t[..., :kl], qt[:, :, qs * g:qe * g], 2, 3)         # (B, K, kl, q)
    s = jnp.where(_block_mask_t(seg, prefix, qs, qe, kl, g), s, _MASK_VALUE)
    m = jnp.max(s, axis=2, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=2, keepdims=True)
    o = _bdot(_operand(p, compute_dtype), vt[:, :, :kl], 2, 2)      # (B, K, q, H)
    return o / l[:, :, 0, :, None], (m + jnp.log(l))[:, :, 0]

  combine = lambda outs: (jnp.concatenate([o for o, _ in outs], axis=2),
                          jnp.concatenate([lse for _, lse in outs], axis=2))
  return _blocked(t, block_q, prefix, block, combine)


def _blocked_bwd_core(qt, kt, k_t, vt, seg, prefix, lse, delta, do, g, block_q,
                      compute_dtype):
  """Backward over the same query blocks.

  qt, do: (B, K, T*G, H); kt, vt: (B, K, T, H); k_t: (B, K, H, T); lse, delta:
  (B, K, T*G).  Returns dq (B, K, T*G, H) (w.r.t. the scaled queries), dk_t and dv_t
  (B, K, H, T), float32.
  """
  t = vt.shape[2]
  v_t = jnp.swapaxes(vt, 2, 3)

  def block(qs, qe, kl):
    rows = slice(qs * g, qe * g)
    qi, doi = qt[:, :, rows], do[:, :, rows]
    s = _bdot(k_t[..., :kl], qi, 2, 3)                              # (B, K, kl, q)
    p = jnp.where(_block_mask_t(seg, prefix, qs, qe, kl, g),
                  jnp.exp(s - lse[:, :, None, rows]), 0.0)
    dv_t = _bdot(doi, _operand(p, compute_dtype), 2, 3)             # (B, K, H, kl)
    dp = _bdot(v_t[..., :kl], doi, 2, 3)                            # (B, K, kl, q)
    ds = _operand(p * (dp - delta[:, :, None, rows]), compute_dtype)
    dqi = _bdot(ds, kt[:, :, :kl], 2, 2)                            # (B, K, q, H)
    dk_t = _bdot(qi, ds, 2, 3)                                      # (B, K, H, kl)
    return dqi, dk_t, dv_t

  combine = lambda outs: (jnp.concatenate([o[0] for o in outs], axis=2),
                          _sum_key_blocks([o[1] for o in outs], t, block_q),
                          _sum_key_blocks([o[2] for o in outs], t, block_q))
  return _blocked(t, block_q, prefix, block, combine)


# Native narrow-dtype dots on XLA:CPU: "queries x keys" orientation.  XLA:CPU runs a
# bf16 x bf16 -> f32 batched dot in bf16 only on YNNPACK, which takes dots whose left
# operand contracts its minor axis and whose operands are row-major; any other batched
# bf16 dot is upcast to float32 (see the module notes).  In this orientation the scores
# are (B, K, q, L): the forward's two dots and the backward's scores, dP and dQ need no
# transpose; the two that contract the query axis (dK, dV) take the bf16 probabilities /
# score gradients transposed, as row-major copies (`_row_major`).


def _qk_dot(a, b, a_contract, b_contract):
  """Batched (axes 0, 1) dot, float32 accumulation; for `_qk` operands (see above)."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), _BATCH),
                         preferred_element_type=F32)


def _row_major(x):
  """x (B, K, ...) with a row-major layout, for a narrow-dtype dot operand (see above).

  jnp transposes come out of XLA's front end as layout changes (free bitcasts), and
  elementwise ops and barriers keep that layout; a batched bf16 dot with such an operand
  is upcast.  Flattening all but the leading axis cannot be a bitcast of a transposed
  layout, so it makes XLA write a row-major copy; the barrier keeps the reshape pair
  from being simplified away.  On an operand that is already row-major it costs nothing.
  """
  return lax.optimization_barrier(x.reshape(x.shape[0], -1)).reshape(x.shape)


def _materialised_t(x, compute_dtype):
  """`_operand(x)` (B, K, q, L) transposed to a row-major (B, K, L, q) copy."""
  return _row_major(jnp.swapaxes(_operand(x, compute_dtype), 2, 3))


def _qk_fwd_core(qt, kt, vt, seg, prefix, g, block_q, compute_dtype):
  """`_blocked_fwd_core` in queries x keys orientation: kt is (B, K, T, H), not k_t."""
  t = vt.shape[2]

  def block(qs, qe, kl):
    s = _qk_dot(qt[:, :, qs * g:qe * g], kt[:, :, :kl], 3, 3)        # (B, K, q, kl)
    s = jnp.where(_block_mask_qk(seg, prefix, qs, qe, kl, g), s, _MASK_VALUE)
    m = jnp.max(s, axis=3, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=3, keepdims=True)
    o = _qk_dot(_operand(p, compute_dtype), vt[:, :, :kl], 3, 2)     # (B, K, q, H)
    return o / l, (m + jnp.log(l))[..., 0]

  combine = lambda outs: (jnp.concatenate([o for o, _ in outs], axis=2),
                          jnp.concatenate([lse for _, lse in outs], axis=2))
  return _blocked(t, block_q, prefix, block, combine)


def _qk_bwd_core(qt, kt, vt, seg, prefix, lse, delta, do, g, block_q, compute_dtype):
  """`_blocked_bwd_core` in queries x keys orientation.

  Returns dq (B, K, T*G, H) (w.r.t. the scaled queries), dk and dv (B, K, T, H), f32.
  """
  t = vt.shape[2]

  def block(qs, qe, kl):
    rows = slice(qs * g, qe * g)
    qi, doi = qt[:, :, rows], do[:, :, rows]
    kb, vb = kt[:, :, :kl], vt[:, :, :kl]
    s = _qk_dot(qi, kb, 3, 3)                                        # (B, K, q, kl)
    p = jnp.where(_block_mask_qk(seg, prefix, qs, qe, kl, g),
                  jnp.exp(s - lse[:, :, rows, None]), 0.0)
    dp = _qk_dot(doi, vb, 3, 3)                                      # (B, K, q, kl)
    ds = p * (dp - delta[:, :, rows, None])
    dqi = _qk_dot(_operand(ds, compute_dtype), kb, 3, 2)             # (B, K, q, H)
    dv = _qk_dot(_materialised_t(p, compute_dtype), doi, 3, 2)       # (B, K, kl, H)
    dk = _qk_dot(_materialised_t(ds, compute_dtype), qi, 3, 2)       # (B, K, kl, H)
    return dqi, dk, dv

  combine = lambda outs: (jnp.concatenate([o[0] for o in outs], axis=2),
                          _sum_key_blocks([o[1] for o in outs], t, block_q, axis=2),
                          _sum_key_blocks([o[2] for o in outs], t, block_q, axis=2))
  return _blocked(t, block_q, prefix, block, combine)


def _queries_by_keys(compute_dtype) -> bool:
  """True if the blocked attention runs in queries x keys orientation (`_qk_*`): narrow
  compute dtypes with native bf16 dots on XLA:CPU.  Otherwise keys x queries (float32
  dots, which XLA:CPU gives Eigen on both cores), also on GPU/TPU."""
  return (jnp.dtype(compute_dtype) != F32 and bf16_dots_native()
          and jax.default_backend() == "cpu")


def _to_blocked_layout(q, k, v, compute_dtype, qk):
  """(B,T,N,H), (B,T,K,H) x2 -> qt (B,K,T*G,H) scaled, keys, vt (B,K,T,H); keys are
  k_t (B,K,H,T), or kt (B,K,T,H) if qk (queries x keys orientation)."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qt = _operand(q.astype(F32) * (1.0 / math.sqrt(h)), compute_dtype)
  qt = qt.reshape(b, t, kh, n // kh, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * (n // kh), h)
  keys = _operand(k, compute_dtype).transpose((0, 2, 1, 3) if qk else (0, 2, 3, 1))
  vt = _operand(v, compute_dtype).transpose(0, 2, 1, 3)
  if qk:
    qt, keys, vt = _row_major(qt), _row_major(keys), _row_major(vt)
  return qt, keys, vt


def _from_blocked_layout(o, t):
  """(B, K, T*G, H) -> (B, T, K*G, H)."""
  b, kh, tg, h = o.shape
  g = tg // t
  return o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, kh * g, h)


def _fwd_core(qt, keys, vt, seg, prefix, g, block_q, compute_dtype):
  core = _qk_fwd_core if _queries_by_keys(compute_dtype) else _blocked_fwd_core
  return core(qt, keys, vt, seg, prefix, g, block_q, compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention_blocked(q, k, v, seg, prefix, block_q, compute_dtype):
  qt, keys, vt = _to_blocked_layout(q, k, v, compute_dtype, _queries_by_keys(compute_dtype))
  g = q.shape[2] // k.shape[2]
  o, _ = _fwd_core(qt, keys, vt, seg, prefix, g, block_q, compute_dtype)
  return _from_blocked_layout(o, q.shape[1])


def _attention_blocked_fwd(q, k, v, seg, prefix, block_q, compute_dtype):
  qt, keys, vt = _to_blocked_layout(q, k, v, compute_dtype, _queries_by_keys(compute_dtype))
  g = q.shape[2] // k.shape[2]
  o, lse = _fwd_core(qt, keys, vt, seg, prefix, g, block_q, compute_dtype)
  dtypes = tuple(jnp.zeros((0,), a.dtype) for a in (q, k, v))
  return _from_blocked_layout(o, q.shape[1]), (qt, keys, vt, seg, prefix, o, lse, dtypes)


def _attention_blocked_bwd(block_q, compute_dtype, res, g):
  qt, keys, vt, seg, prefix, o, lse, (qdt, kdt, vdt) = res
  b, kh, tg, h = o.shape
  t = vt.shape[2]
  do = g.astype(F32).reshape(b, t, kh, tg // t, h).transpose(0, 2, 1, 3, 4).reshape(o.shape)
  delta = jnp.sum(do * o, axis=-1)
  if _queries_by_keys(compute_dtype):
    dq, dk, dv = _qk_bwd_core(qt, keys, vt, seg, prefix, lse, delta,
                              _row_major(_operand(do, compute_dtype)), tg // t, block_q,
                              compute_dtype)
    to_btkh = (0, 2, 1, 3)  # dk, dv: (B, K, T, H)
  else:
    dq, dk, dv = _blocked_bwd_core(qt, jnp.swapaxes(keys, 2, 3), keys, vt, seg, prefix,
                                   lse, delta, _operand(do, compute_dtype), tg // t,
                                   block_q, compute_dtype)
    to_btkh = (0, 3, 1, 2)  # dk, dv: (B, K, H, T)
  dq = _from_blocked_layout(dq, t) * (1.0 / math.sqrt(h))
  dk, dv = dk.transpose(to_btkh), dv.transpose(to_btkh)
  return (dq.astype(qdt.dtype), dk.astype(kdt.dtype), dv.astype(vdt.dtype), None, None)


_attention_blocked.defvjp(_attention_blocked_fwd, _attention_blocked_bwd)


def default_block_q(t: int) -> int:
  """Query-block size of the blocked attention for sequence length t (see `attention`)."""
  if t <= 512:
    return 64
  return max(128, -(-t // 16 // 64) * 64)  # at most ~16 unrolled blocks


def attention(q, k, v, segment_ids, prefix, *, compute_dtype=F32, impl="auto",
              block_q=None, q_positions=None, kv_positions=None, kv_segment_ids=None,
              kv_prefix=None):
  """Grouped-query attention with segment / causal / prefix-LM masking.

  Args:
    q: (B, T, N, H) queries; k, v: (B, S, K, H) keys / values, N % K == 0 (GQA: query
      head n uses kv head n // (N/K)).
    segment_ids: (B, T) int, packed documents (0 = padding, which attends padding).
    prefix: (B, T) bool, key j is visible to every query of its segment if prefix[j]
      (all False: causal; all True: bidirectional; leading True run: prefix-LM).
    compute_dtype: operand dtype of the two matmuls (float32 or bfloat16); scores,
      softmax and the output are float32.
    impl: 'auto' (= 'blocked' for self-attention, 'reference' when the decoding
      arguments below are given), 'blocked' or 'reference'.
    block_q: query-block size of 'blocked' (default `default_block_q(T)`).
    q_positions, kv_positions, kv_segment_ids, kv_prefix: decoding against a cache,
      see `attention_mask`; only 'reference' implements them.

  Returns:
    (B, T, N, H) float32.  Scale 1/sqrt(H).

  The blocked version ('blocked') splits the queries into static blocks of block_q rows.
  Without prefix tokens query block [s, e) only needs keys [0, e), so each block
  computes scores against those keys only, which skips (1 - 1/n_blocks)/2 of the work
  for causal masks (packed or not); one `lax.cond` on any(prefix) switches the whole
  pass to all keys (bidirectional / prefix-LM batches).  A block is a full softmax over
  its key range (no running max across key blocks), small enough that its
  (B, K, L, block_q*G) scores stay cheap, big enough for efficient batched matmuls.  The
  G = N/K query heads of a kv head are folded into the matmul columns, so GQA reads each
  kv head once.  Float32 scores are laid out keys x queries so that every batched dot
  goes to XLA:CPU's two-core Eigen path; with native bf16 dots on XLA:CPU they are laid
  out queries x keys so that every dot stays bf16 on YNNPACK (see the module notes).  A
  custom VJP stores only the log-sum-exp per query and recomputes the probabilities
  block by block in the backward pass (5 matmuls per block instead of autodiff's 4 plus
  saved N x T x T probabilities and masks).
  """
  if impl not in ("auto", "blocked", "reference"):
    raise ValueError(f"unknown attention impl {impl!r}")
  decoding = any(a is not None for a in (q_positions, kv_positions, kv_segment_ids, kv_prefix))
  if impl == "reference" or (impl == "auto" and (decoding or q.shape[1] != k.shape[1])):
    return attention_reference(q, k, v, segment_ids, prefix, compute_dtype=compute_dtype,
                               q_positions=q_positions, kv_positions=kv_positions,
                               kv_segment_ids=kv_segment_ids, kv_prefix=kv_prefix)
  if decoding or q.shape[1] != k.shape[1]:
    raise ValueError("impl='blocked' is self-attention only (no positions / cache)")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"N={q.shape[2]} query heads is not a multiple of K={k.shape[2]}")
  t = q.shape[1]
  bq = default_block_q(t) if block_q is None else int(block_q)
  return _attention_blocked(q, k, v, segment_ids.astype(jnp.int32), prefix.astype(bool),
                            min(bq, t), jnp.dtype(compute_dtype))


# --------------------------------------------------------------------------------------
# tied LM head + cross-entropy
# --------------------------------------------------------------------------------------


def _head_stats(logits, targets):
  """Per-row (max, sum exp(logits - max), lse, target logit) of float32 logits (c, V)."""
  m = jnp.max(logits, axis=-1)
  p = jnp.exp(logits - m[:, None])
  l = jnp.sum(p, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return m, p, l, m + jnp.log(l), tgt


def lm_head_loss_reference(h, w, targets, weights, *, z_loss=0.0, compute_dtype=F32):
  """Plain tied-head loss: full (N, V) float32 logits, log-softmax, weighted sums.

  h: (N, D); w: (V, D) embedding matrix (logits = h @ w.T); targets: (N,) int;
  weights: (N,) float.  Returns (loss_sum, z_loss_sum, correct_sum), float32 scalars:
    loss_sum   = sum_n weights_n * (logsumexp(logits_n) - logits_n[targets_n])
    z_loss_sum = sum_n weights_n * z_loss * logsumexp(logits_n)**2
    correct_sum = sum_n weights_n * [argmax(logits_n) == targets_n]
  """
  logits = jnp.einsum("nd,vd->nv", h.astype(compute_dtype), w.astype(compute_dtype),
                      preferred_element_type=F32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(F32)
  weights = weights.astype(F32)
  return (jnp.sum(weights * (lse - tgt)), jnp.sum(weights * z_loss * lse**2),
          jnp.sum(weights * correct))


def _chunked(h, targets, weights, chunk):
  """Pads N to a multiple of chunk (weight 0) and reshapes to (N/chunk, chunk, ...)."""
  n = h.shape[0]
  n_pad = -(-n // chunk) * chunk
  h, targets, weights = (_pad_rows(a, n_pad) for a in (h, targets, weights))
  c = n_pad // chunk
  return h.reshape(c, chunk, -1), targets.reshape(c, chunk), weights.reshape(c, chunk)


def _head_chunk(hc, wc, t, wt, z_loss, compute_dtype, with_grad):
  """One chunk: per-row (loss, z, correct) and, if with_grad, the gradient pieces.

  Gradient pieces for cotangents (g_loss, g_z): dlogits = g_loss * a + g_z * b with
    a = wt * (softmax - onehot(t)),   b = wt * 2 z_loss lse * softmax,
  so dh = g_loss * (a @ W) + g_z * (b @ W) and dW = g_loss * a.T @ h + g_z * b.T @ h.
  """
  logits = _dot(hc, wc, _NT)  # (c, D) x (V, D) -> (c, V) float32
  m, p, l, lse, tgt = _head_stats(logits, t)
  # "correct" = the target's logit is the row maximum (argmax, except that a tie
  # counts as correct); a variadic argmax reduce is ~10x slower than max on XLA:CPU.
  rows = (lse - tgt, z_loss * lse**2, (tgt >= m).astype(F32))
  if not with_grad:
    return rows, None
  onehot = jnp.arange(logits.shape[1])[None, :] == t[:, None]
  a = _operand((wt / l)[:, None] * p - jnp.where(onehot, wt[:, None], 0.0), compute_dtype)
  dh_a = _dot(a, wc, _NN)
  dw_a = _dot_tn(hc, a)  # transposed, (D, V): accumulated so, transposed once at the end
  if z_loss:
    b = _operand((wt * 2.0 * z_loss * lse / l)[:, None] * p, compute_dtype)
    dh_b, dw_b = _dot(b, wc, _NN), _dot_tn(hc, b)
  else:
    dh_b, dw_b = jnp.zeros_like(dh_a), None
  return rows, (dh_a, dh_b, dw_a, dw_b)


def _head_forward(h, w, targets, weights, z_loss, compute_dtype, chunk, with_grad):
  """Scan over row chunks; never more than (chunk, V) logits alive."""
  n, d = h.shape
  wc = _operand(w, compute_dtype)
  hs, ts, wts = _chunked(_operand(h, compute_dtype), targets, weights.astype(F32), chunk)
  dw0 = jnp.zeros(w.shape[::-1], F32)  # dW transposed: (D, V)
  carry0 = (dw0, dw0 if z_loss else None)

  def body(carry, xs):
    hc, t, wt = xs
    rows, grads = _head_chunk(hc, wc, t, wt, z_loss, compute_dtype, with_grad)
    if not with_grad:
      return carry, (rows, None)
    dh_a, dh_b, dw_a, dw_b = grads
    carry = (carry[0] + dw_a, None if dw_b is None else carry[1] + dw_b)
    return carry, (rows, (dh_a, dh_b))

  if hs.shape[0] == 1:  # one chunk: no loop
    carry, ys = body(carry0, (hs[0], ts[0], wts[0]))
    ys = jax.tree.map(lambda a: a[None], ys)
  else:
    carry, ys = lax.scan(body, carry0, (hs, ts, wts))
  rows, dhs = ys
  rows = tuple(r.reshape(-1)[:n] for r in rows)
  wt = weights.astype(F32)
  sums = tuple(jnp.sum(wt * r) for r in rows)
  if not with_grad:
    return sums, None
  dh_a, dh_b = (x.reshape(-1, d)[:n] for x in dhs)
  # The barrier keeps XLA from folding the transpose into the dot that made the (D, V)
  # sum (one chunk: no loop in between): the folded dot contracts the rows of its left
  # operand, a layout XLA:CPU has no bf16 x bf16 -> f32 kernel for, and it fails at run
  # time ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32").
  carry = lax.optimization_barrier(carry)
  dw_b = None if carry[1] is None else carry[1].T
  return sums, (rows, dh_a, dh_b, carry[0].T, dw_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lm_head_loss(h, w, targets, weights, z_loss, compute_dtype, chunk):
  sums, _ = _head_forward(h, w, targets, weights, z_loss, compute_dtype, chunk, False)
  return sums


def _lm_head_loss_fwd(h, w, targets, weights, z_loss, compute_dtype, chunk):
  sums, res = _head_forward(h, w, targets, weights, z_loss, compute_dtype, chunk, True)
  dtypes = tuple(jnp.zeros((0,), a.dtype) for a in (h, w, weights))
  return sums, (res, dtypes)


def _lm_head_loss_bwd(z_loss, compute_dtype, chunk, res, g):
  (rows, dh_a, dh_b, dw_a, dw_b), (hdt, wdt, wtdt) = res
  g_loss, g_z, g_correct = g
  dh = g_loss * dh_a + g_z * dh_b
  dw = g_loss * dw_a if dw_b is None else g_loss * dw_a + g_z * dw_b
  dweights = g_loss * rows[0] + g_z * rows[1] + g_correct * rows[2]
  return (dh.astype(hdt.dtype), dw.astype(wdt.dtype), None, dweights.astype(wtdt.dtype))


_lm_head_loss.defvjp(_lm_head_loss_fwd, _lm_head_loss_bwd)


def lm_head_loss(h, w, targets, weights, *, z_loss=0.0, compute_dtype=F32,
                 chunk_size=None):
  """Tied LM head + softmax cross-entropy, fused and chunked over rows.

  Args:
    h: (N, D) final hidden states (float32; N = B*T).
    w: (V, D) embedding matrix; logits = h @ w.T (float32 accumulation).
    targets: (N,) int token ids.
    weights: (N,) float per-token weights (0 for padding / prompt).
    z_loss: python float, coefficient of the z-loss.
    compute_dtype: dot operand dtype (float32 or bfloat16); logits, softmax, loss f32.
    chunk_size: rows per chunk (None: min(N, 512)); N is padded with weight-0 rows.

  Returns:
    (loss_sum, z_loss_sum, correct_sum): float32 scalars, the weighted sums defined in
    `lm_head_loss_reference`.  Divide by sum(weights) in the model.

  Why this shape: the (N, V) logits are the largest tensor of the step (N=2048,
  V=8192: 64 MiB f32), and on a CPU every elementwise pass over them is memory-bound.
  A `lax.scan` over row chunks keeps at most (chunk, V) logits alive.  The custom VJP
  computes the gradient *in the forward pass* (the loss is a sum, so d/dlogits is
  known up to the scalar cotangents): softmax - onehot is formed while the chunk's
  logits are hot, and dh, dW are accumulated right away; the backward pass only
  scales.  That is 3 matmuls (logits, dh, dW; 4 with z_loss != 0), no recomputation
  of logits and nothing of size N x V saved.  Without differentiation the plain
  forward (no gradient work) runs.  Dot layouts: logits contract (1, 1), dh is a plain
  (c, V) x (V, D), dW uses `_dot_tn`, all on XLA:CPU's fast (YNNPACK) kernels also for
  bf16, which avoids the "Unsupported element type for DotThunk" failure that a tied
  head hits when autodiff produces a bf16 ((0,), (0,)) dot.
  """
  n = h.shape[0]
  chunk = min(n, 512) if chunk_size is None else min(int(chunk_size), n)
  return _lm_head_loss(h, w, targets, weights, float(z_loss), jnp.dtype(compute_dtype), chunk)
