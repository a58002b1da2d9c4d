"""research.kernels vs the plain reference versions: values and gradients.

float32 compute is compared tightly (relative to the largest entry, ~1e-5); bfloat16
compute loosely (bf16 has 8 mantissa bits; operands are rounded at slightly different
points in the kernels and in the references).  The bf16 cases run in both dot modes of
kernels.BF16_DOTS ('native' bf16 x bf16 -> f32 dots, and 'f32' emulation), so a dot that
falls off XLA's bf16 path (`UNIMPLEMENTED: Unsupported element type for DotThunk`)
fails here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import kernels as K

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 3e-2}


def assert_close(actual, expected, tol, what=""):
  actual = np.asarray(jnp.asarray(actual, F32))
  expected = np.asarray(jnp.asarray(expected, F32))
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  err = float(np.max(np.abs(actual - expected))) / scale
  assert err <= tol, f"{what}: max error {err:.2e} (relative to max |x| {scale:.3g}) > {tol}"


@pytest.fixture(params=["f32", "native"])
def bf16_mode(request, monkeypatch):
  monkeypatch.setattr(K, "BF16_DOTS", request.param)
  return request.param


def value_and_grads(f, cotangent, *args):
  """f(*args) and the gradients of <f(*args), cotangent> wrt all args: one jit."""
  def both(*a):
    out, vjp = jax.vjp(f, *a)
    return out, vjp(cotangent)
  return jax.jit(both)(*args)


# --------------------------------------------------------------------------------------
# dense


@pytest.mark.parametrize("cd,n,mode", [(F32, 64, "f32"), (F32, 33, "f32"),  # odd N: fallback
                                        (BF16, 64, "native"), (BF16, 64, "f32"),
                                        (BF16, 33, "native")])
def test_dense(cd, n, mode, monkeypatch):
  monkeypatch.setattr(K, "BF16_DOTS", mode)
  d, f = 48, 80
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(ks[0], (n, d), F32)
  w = jax.random.normal(ks[1], (d, f), F32) / np.sqrt(d)
  ct = jax.random.normal(ks[2], (n, f), F32)
  y, g = value_and_grads(lambda x, w: K.dense(x, w, cd), ct, x, w)
  r_y, r = value_and_grads(lambda x, w: K.dense_reference(x, w, cd), ct, x, w)
  assert y.dtype == F32
  assert_close(y, r_y, TOL[cd], "dense value")
  assert g[0].dtype == F32 and g[1].dtype == F32
  assert_close(g[0], r[0], TOL[cd], "dense dx")
  assert_close(g[1], r[1], TOL[cd], "dense dw")


def test_dense_bf16_inputs_give_bf16_grads():
  x = jnp.ones((8, 4), BF16)
  w = jnp.ones((4, 6), F32)
  gx, gw = jax.grad(lambda x, w: jnp.sum(K.dense(x, w, BF16)), argnums=(0, 1))(x, w)
  assert gx.dtype == BF16 and gw.dtype == F32
  np.testing.assert_allclose(np.asarray(gx, np.float32), 6.0)
  np.testing.assert_allclose(np.asarray(gw), 8.0)


# --------------------------------------------------------------------------------------
# attention


def test_attention_mask_rule():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  prefix = jnp.array([[True, False, False, True, False, False]])
  m = np.asarray(K.attention_mask(seg, prefix))[0].astype(int)
  expected = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1],
  ])
  np.testing.assert_array_equal(m, expected)
  # the prefix token of segment 1 is visible to all of segment 1 (and only to it)
  full_prefix = K.attention_mask(seg, jnp.ones_like(prefix))
  np.testing.assert_array_equal(np.asarray(full_prefix)[0], np.asarray(seg[0][:, None] == seg[0][None, :]))


T = 24  # not a multiple of the block size 16 used below (blocks [0, 16), [16, 24))


def attn_inputs(b=2, t=T, n=4, kh=2, h=16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), F32)
  k = jax.random.normal(ks[1], (b, t, kh, h), F32)
  v = jax.random.normal(ks[2], (b, t, kh, h), F32)
  ct = jax.random.normal(ks[3], (b, t, n, h), F32)
  return q, k, v, ct


def masks(kind, t=T):
  """Per-row mask kinds, 3 rows each.  'causal_rows': no key is a prefix key, so every
  query block takes the causal-only branch; 'prefix_rows': some rows have prefix keys,
  so early blocks take the all-keys branch."""
  pos = jnp.arange(t)
  packed = jnp.where(pos < 7, 1, jnp.where(pos < 15, 2, jnp.where(pos < 21, 3, 0)))
  if kind == "causal_rows":  # causal; packed docs + padding; two docs
    seg = jnp.stack([jnp.ones(t, jnp.int32), packed, jnp.where(pos < 13, 5, 6)])
    return seg.astype(jnp.int32), jnp.zeros((3, t), bool)
  if kind == "prefix_rows":  # bidirectional; prefix-LM (5 tokens); packed, prefix in doc 2
    seg = jnp.stack([jnp.ones(t, jnp.int32), jnp.ones(t, jnp.int32), packed])
    prefix = jnp.stack([jnp.ones(t, bool), pos < 5, (pos >= 7) & (pos < 12)])
    return seg.astype(jnp.int32), prefix
  raise ValueError(kind)


@pytest.mark.parametrize("cd,kind,mode", [(F32, "causal_rows", "f32"), (F32, "prefix_rows", "f32"),
                                          (BF16, "causal_rows", "native"),
                                          (BF16, "prefix_rows", "native"),
                                          (BF16, "prefix_rows", "f32")])
def test_attention_blocked(cd, kind, mode, monkeypatch):
  """GQA (N=4, K=2), T=24 in blocks of 16 (last block short), all mask kinds."""
  monkeypatch.setattr(K, "BF16_DOTS", mode)
  q, k, v, ct = attn_inputs(b=3)
  seg, prefix = masks(kind)

  def blocked(q, k, v):
    return K.attention(q, k, v, seg, prefix, compute_dtype=cd, impl="blocked", block_q=16)

  def ref(q, k, v):
    return K.attention_reference(q, k, v, seg, prefix, compute_dtype=cd)

  out, g = value_and_grads(blocked, ct, q, k, v)
  r_out, r = value_and_grads(ref, ct, q, k, v)
  assert_close(out, r_out, TOL[cd], "attention value")
  for name, a, e in zip("qkv", g, r):
    assert_close(a, e, TOL[cd], f"attention d{name}")


def test_attention_default_block_mha():
  """Default block size (one block at T=24), plain multi-head attention, f32."""
  q, k, v, ct = attn_inputs(b=3, n=2, kh=2)
  seg, prefix = masks("prefix_rows")
  f = lambda q, k, v: K.attention(q, k, v, seg, prefix)
  r = lambda q, k, v: K.attention_reference(q, k, v, seg, prefix)
  out, g = value_and_grads(f, ct, q, k, v)
  r_out, e = value_and_grads(r, ct, q, k, v)
  assert_close(out, r_out, TOL[F32], "value")
  for name, a, b in zip("qkv", g, e):
    assert_close(a, b, TOL[F32], f"d{name}")


def test_attention_reference_gqa_matches_repeated_heads():
  q, k, v, _ = attn_inputs(b=3, n=4, kh=2)
  seg, prefix = masks("prefix_rows")
  gqa = jax.jit(K.attention_reference)(q, k, v, seg, prefix)
  mha = jax.jit(K.attention_reference)(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), seg, prefix)
  assert_close(gqa, mha, 1e-6, "gqa")


def test_attention_reference_decoding_positions():
  """Last 3 queries against the full cache (explicit positions) == rows of the full pass."""
  q, k, v, _ = attn_inputs(b=3, n=4, kh=2)
  seg, prefix = masks("prefix_rows")
  full = jax.jit(K.attention_reference)(q, k, v, seg, prefix)
  b, t = seg.shape
  rows = slice(t - 3, t)
  dec = jax.jit(lambda q, k, v: K.attention(
      q, k, v, seg[:, rows], prefix[:, rows],
      q_positions=jnp.broadcast_to(jnp.arange(t)[rows], (b, 3)),
      kv_positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
      kv_segment_ids=seg, kv_prefix=prefix))(q[:, rows], k, v)
  assert_close(dec, full[:, rows], 1e-6, "decode")


def ynn_dot_count(hlo_text):
  """Number of dots inside YNNPACK fusions of compiled XLA:CPU HLO text."""
  import re
  called = set(re.findall(r'__ynn_fusion.*?calls=%([\w.\-]+)|calls=%([\w.\-]+).*?__ynn_fusion',
                          hlo_text))
  called = {a or b for a, b in called}
  blocks = re.split(r"\n(?=%?[\w.\-]+ \()", hlo_text)
  return sum(b.count(" dot(") for b in blocks if b.lstrip("%").split(" ", 1)[0] in called)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU dot placement")
def test_attention_blocked_dots_take_the_two_core_path():
  """Every batched dot of the float32 blocked attention (forward and backward) contracts
  a non-minor axis of its left operand, so XLA:CPU runs it on Eigen (both cores), not
  as a one-core YNNPACK fusion; the plain version's dots do go to YNNPACK."""
  q, k, v, ct = attn_inputs(b=2, t=128, n=4, kh=2, h=32)
  seg, prefix = jnp.ones((2, 128), jnp.int32), jnp.zeros((2, 128), bool)
  def hlo(impl):
    f = lambda q, k, v: jnp.vdot(K.attention(q, k, v, seg, prefix, impl=impl, block_q=32), ct)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  assert ynn_dot_count(hlo("reference")) > 0  # the check can see YNNPACK dots
  assert ynn_dot_count(hlo("blocked")) == 0


def attention_dots(hlo_text):
  """(result shape, operand dtypes) of each batched dot of compiled XLA:CPU HLO text,
  the operand dtypes read from the parameters of the computation the dot is in."""
  import re
  out = []
  for block in re.split(r"\n(?=%?[\w.\-]+ \()", hlo_text):
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[[\d,]*\]\{[\d,]*\} parameter\(", block))
    types.update(re.findall(r"%([\w.\-]+) = (\w+)\[[\d,]*\]\{[\d,]*\} [a-z]", block))
    for m in re.finditer(r"= (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\), lhs_batch", block):
      out.append((m.group(1), types.get(m.group(2)), types.get(m.group(3))))
  return out


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU dot placement")
def test_attention_native_bf16_dots_stay_bf16_on_ynnpack(monkeypatch):
  """With native bf16 dots every batched dot of the blocked attention (forward and
  backward, both branches of the prefix cond: the masks are arguments, not constants)
  is a bf16 x bf16 dot inside a YNNPACK fusion.  XLA:CPU upcasts a batched bf16 dot that
  YNNPACK cannot take (an operand contracting a non-minor axis, or one whose layout is a
  transpose) to a float32 dot, silently: bf16 attention then runs at float32 speed."""
  monkeypatch.setattr(K, "BF16_DOTS", "native")
  q, k, v, ct = attn_inputs(b=3, t=T)
  seg, prefix = masks("prefix_rows")
  f = lambda q, k, v, seg, prefix: jnp.vdot(K.attention(
      q, k, v, seg, prefix, compute_dtype=BF16, impl="blocked", block_q=16), ct)
  text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v, seg, prefix).compile().as_text()
  dots = attention_dots(text)
  # 2 query blocks x (2 forward + 5 backward dots, less the backward's recomputed scores
  # if XLA merges them with the forward's) in each of the two cond branches.
  assert len(dots) >= 2 * 2 * 6, dots
  assert all(a == b == "bf16" for _, a, b in dots), dots
  assert ynn_dot_count(text) == len(dots)


# --------------------------------------------------------------------------------------
# LM head


def head_inputs(n=37, d=16, v=50, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  h = jax.random.normal(ks[0], (n, d), F32)
  w = jax.random.normal(ks[1], (v, d), F32) * 0.3
  targets = jax.random.randint(ks[2], (n,), 0, v)
  weights = (jax.random.uniform(ks[3], (n,)) > 0.2).astype(F32) * 1.5
  return h, w, targets, weights


@pytest.mark.parametrize("cd,z_loss,chunk", [(F32, 0.0, None), (F32, 1e-2, 16), (BF16, 1e-2, 8)])
def test_lm_head_loss(cd, z_loss, chunk):
  h, w, targets, weights = head_inputs()
  cot = (jnp.float32(1.3), jnp.float32(0.7), jnp.float32(0.5))

  def kern(h, w, weights):
    return K.lm_head_loss(h, w, targets, weights, z_loss=z_loss, compute_dtype=cd,
                          chunk_size=chunk)

  def ref(h, w, weights):
    return K.lm_head_loss_reference(h, w, targets, weights, z_loss=z_loss, compute_dtype=cd)

  out, g = value_and_grads(kern, cot, h, w, weights)
  expected, r = value_and_grads(ref, cot, h, w, weights)
  for name, a, e in zip(("loss", "z", "correct"), out, expected):
    assert_close(a, e, TOL[cd], f"lm head {name}")
  for name, a, e in zip(("dh", "dw", "dweights"), g, r):
    assert_close(a, e, TOL[cd], f"lm head {name}")


@pytest.mark.parametrize("z_loss,chunk", [(1e-3, 32), (1e-3, None), (0.0, None)])
def test_lm_head_loss_bf16_modes(bf16_mode, z_loss, chunk):
  """chunk None = one chunk, no loop: in 'native' mode XLA used to fold the transpose of
  dW into its dot there, a bf16 dot XLA:CPU cannot run (DotThunk: BF16 x BF16 = F32)."""
  h, w, targets, weights = head_inputs(n=64)
  kern = lambda h, w: K.lm_head_loss(h, w, targets, weights, z_loss=z_loss,
                                     compute_dtype=BF16, chunk_size=chunk)[0]
  ref = lambda h, w: K.lm_head_loss_reference(h, w, targets, weights, z_loss=z_loss,
                                              compute_dtype=BF16)[0]
  loss, g = value_and_grads(kern, jnp.float32(1.0), h, w)
  r_loss, r = value_and_grads(ref, jnp.float32(1.0), h, w)
  assert_close(loss, r_loss, TOL[BF16], "loss")
  assert_close(g[0], r[0], TOL[BF16], "dh")
  assert_close(g[1], r[1], TOL[BF16], "dw")


@pytest.mark.slow
def test_string_compute_dtypes():
  """The model passes compute_dtype as a string ('float32' / 'bfloat16')."""
  x, w = jnp.ones((4, 8)), jnp.ones((8, 2))
  np.testing.assert_allclose(jax.jit(lambda x, w: K.dense(x, w, "bfloat16"))(x, w), 8.0)
  q, k, v, _ = attn_inputs(b=3, t=8)
  seg, prefix = masks("causal_rows", t=8)
  attn = lambda q, k, v: K.attention(q, k, v, seg, prefix, compute_dtype="bfloat16")
  assert jax.eval_shape(jax.grad(lambda *a: jnp.sum(attn(*a))), q, k, v).dtype == F32
  h, we, targets, weights = head_inputs(n=8)
  head = lambda h, w: K.lm_head_loss(h, w, targets, weights, compute_dtype="bfloat16")[0]
  assert jax.eval_shape(jax.grad(head), h, we).dtype == F32


def test_lm_head_loss_known_value():
  """Uniform logits: loss = log V per token, z = z_loss * (log V)^2."""
  n, d, v = 6, 4, 10
  h = jnp.zeros((n, d))
  w = jax.random.normal(jax.random.PRNGKey(1), (v, d))
  targets = jnp.arange(n) % v
  weights = jnp.ones((n,))
  loss, z, _ = jax.jit(lambda h, w: K.lm_head_loss(h, w, targets, weights, z_loss=0.1,
                                                    chunk_size=4))(h, w)
  np.testing.assert_allclose(loss, n * np.log(v), rtol=1e-6)
  np.testing.assert_allclose(z, n * 0.1 * np.log(v) ** 2, rtol=1e-6)
