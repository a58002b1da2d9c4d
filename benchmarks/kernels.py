"""Kernel benchmark: research.kernels vs the plain JAX versions at the "bench" shapes.

    python -m benchmarks.kernels            # dense, attention (T=256), LM head; f32 and bf16
    python -m benchmarks.kernels --long     # also attention at T=1024 and T=2048
    python -m benchmarks.kernels --hlo      # also: where each dot of fwd+bwd runs (YNNPACK or not)
    python -m benchmarks.kernels --reps 9   # more repetitions (default 5)

Bench model: 6 layers, d_model 384, 6 heads of 64, T=256, batch 8 (N = B*T = 2048 rows),
GELU MLP 4x, vocab 8192, tied embeddings.

Every variant is timed round-robin (variant after variant, `reps` times) and each of
its runs is paired with a run of a float32 2048x2048 jnp.dot right next to it, the
denominator of "utilisation": the machine is shared and its speed drifts by 2-4x within
minutes, so only ratios taken side by side mean anything.  "xDOT" is the median over
repetitions of (variant GFLOP/s) / (GFLOP/s of its paired dot); ms and GFLOP/s columns
are plain medians (they move with the machine's load).

FLOP conventions: dense 2*N*D*F forward, 3x that forward+backward; attention
4*B*T*T*N*H forward (the full square, as in 6N + 12*L*d*T; the blocked kernel skips
fully masked blocks, so its number is an *effective* rate), 3x forward+backward (the
kernel itself does one more score matmul in its backward); LM head 2*N*D*V forward,
3x with backward.

bf16 rows are run in both dot modes of research.kernels.BF16_DOTS: 'native' (bf16 x bf16
-> f32 dots) and 'f32' (bf16-rounded operands on float32 dots); 'auto' picks native only
on CPUs with avx512_bf16/amx_bf16.  The plain versions always use native bf16 dots.
"""
from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as bench
from experiments import common
from research import kernels as K

F32 = jnp.float32
BF16 = jnp.bfloat16


def cpu_summary() -> str:
  model, flags = platform.processor() or "?", ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model in ("?", "", "x86_64"):
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          flags = line
          break
  except OSError:
    pass
  feats = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in flags]
  return f"{model}, {os.cpu_count()} cpus, features: {' '.join(feats) or 'unknown'}"


def _time(f, a) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(f(*a))
  return time.perf_counter() - t0


def compare(fns: dict, dot, reps: int) -> dict:
  """fns: name -> (compiled, args); dot: (compiled, args) of the reference dot.

  Round-robin: each repetition times every variant right after a run of the reference
  dot, so each variant gets its own paired dot time.  Returns name -> (median seconds,
  median dot seconds of its pairs, median of the paired ratios dot_time / time).  The
  paired ratio is robust to the machine's speed drifting during the group.
  """
  jax.block_until_ready(dot[0](*dot[1]))
  for f, a in fns.values():
    jax.block_until_ready(f(*a))
  times = {n: [] for n in fns}
  for _ in range(reps):
    for n, (f, a) in fns.items():
      times[n].append((_time(f, a), _time(*dot)))
  out = {}
  for n, v in times.items():
    t = np.array(v)
    out[n] = (float(np.median(t[:, 0])), float(np.median(t[:, 1])),
              float(np.median(t[:, 1] / t[:, 0])))
  return out


def _dot_entry():
  a = jax.random.normal(jax.random.PRNGKey(99), (2048, 2048), F32)
  return jax.jit(jnp.dot).lower(a, a).compile(), (a, a)


DOT_FLOP = 2 * 2048**3


def grad_fn(f, argnums):
  """fwd+bwd of a scalar made from f's (first) output; returns the gradients."""
  def loss(*a):
    out = f(*a)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out * out) if out.ndim else out
  return jax.grad(loss, argnums=argnums)


def run_group(title, variants, args, flop_fwd, reps):
  """variants: name -> function(*args).  Times fwd and fwd+bwd of each, paired with the dot.

  Returns ({name: (seconds, GFLOP/s, xDOT)}, GFLOP/s of the dot over the group).  xDOT is
  the median over repetitions of (variant GFLOP/s) / (dot GFLOP/s measured just before).
  """
  fns = {}
  argnums = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  for name, f in variants.items():
    fns[name + " fwd"] = (jax.jit(f).lower(*args).compile(), args)
    fns[name + " fwd+bwd"] = (jax.jit(grad_fn(f, argnums)).lower(*args).compile(), args)
  t = compare(fns, _dot_entry(), reps)
  dot = DOT_FLOP / float(np.median([v[1] for v in t.values()])) / 1e9
  print(f"\n{title}   [f32 2048^2 jnp.dot in this group: {dot:.0f} GFLOP/s]")
  rows = {}
  for name, (sec, dot_sec, ratio) in t.items():
    flop = flop_fwd * (3 if name.endswith("fwd+bwd") else 1)
    g = flop / sec / 1e9
    x = ratio * flop / DOT_FLOP
    rows[name] = (sec, g, x)
    print(f"  {name:36s} {sec * 1e3:9.2f} ms {g:8.1f} GFLOP/s {x:6.2f} xDOT")
  return rows, dot


def with_mode(mode, f):
  """Runs f with research.kernels.BF16_DOTS = mode while tracing."""
  def g(*a):
    old = K.BF16_DOTS
    K.BF16_DOTS = mode
    try:
      return f(*a)
    finally:
      K.BF16_DOTS = old
  return g


def dtype_variants(plain, kernel):
  """{label: (compute_dtype, {name: fn})} for f32 and bf16 (kernel in both dot modes)."""
  return {
      "float32": (F32, {"plain": plain(F32), "kernel": kernel(F32)}),
      "bf16": (BF16, {"plain": plain(BF16),
                      "kernel[native bf16 dots]": with_mode("native", kernel(BF16)),
                      "kernel[f32 dots]": with_mode("f32", kernel(BF16))}),
  }


def bench_dense(reps):
  n = 2048
  shapes = {"mlp up 384->1536": (384, 1536), "mlp down 1536->384": (1536, 384),
            "qkv 384->1152": (384, 1152), "attn out 384->384": (384, 384)}
  results = {}
  for label, (d, f) in shapes.items():
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d), F32)
    w = jax.random.normal(jax.random.PRNGKey(1), (d, f), F32) / np.sqrt(d)
    for dname, (cd, variants) in dtype_variants(
        lambda cd: (lambda x, w: K.dense_reference(x, w, cd)),
        lambda cd: (lambda x, w: K.dense(x, w, cd))).items():
      results[(label, dname)] = run_group(f"dense {label}, N={n}, {dname}", variants,
                                          (x, w), 2 * n * d * f, reps)
  return results


def attention_inputs(b, t, n, kh, h, kind="causal"):
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), F32)
  k = jax.random.normal(ks[1], (b, t, kh, h), F32)
  v = jax.random.normal(ks[2], (b, t, kh, h), F32)
  seg = jnp.ones((b, t), jnp.int32)
  if kind == "causal":
    prefix = jnp.zeros((b, t), bool)
  elif kind == "prefix":
    prefix = jnp.broadcast_to(jnp.arange(t) < t // 4, (b, t))
  else:
    prefix = jnp.ones((b, t), bool)
  return q, k, v, seg, prefix


def bench_attention(reps, configs):
  results = {}
  for (b, t, n, kh, h, kind) in configs:
    args = attention_inputs(b, t, n, kh, h, kind)
    flop = 4 * b * t * t * n * h
    for dname, (cd, variants) in dtype_variants(
        lambda cd: (lambda q, k, v, s, p: K.attention_reference(q, k, v, s, p, compute_dtype=cd)),
        lambda cd: (lambda q, k, v, s, p: K.attention(q, k, v, s, p, compute_dtype=cd))).items():
      if cd == F32:
        variants["jax.nn.dot_product_attention"] = _dpa(F32)
      label = f"attention B={b} T={t} N={n} K={kh} H={h} {kind}, {dname}"
      results[(b, t, kind, dname)] = run_group(label, variants, args, flop, reps)
  return results


def _dpa(cd):
  def f(q, k, v, seg, prefix):
    mask = K.attention_mask(seg, prefix)[:, None]
    return jax.nn.dot_product_attention(q.astype(cd), k.astype(cd), v.astype(cd),
                                        mask=mask).astype(F32)
  return f


def bench_head(reps):
  n, d, v = 2048, 384, 8192
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  h = jax.random.normal(ks[0], (n, d), F32)
  w = jax.random.normal(ks[1], (v, d), F32) * 0.05
  targets = jax.random.randint(ks[2], (n,), 0, v)
  weights = jnp.ones((n,), F32)
  results = {}
  for dname, (cd, variants) in dtype_variants(
      lambda cd: (lambda h, w: K.lm_head_loss_reference(h, w, targets, weights, compute_dtype=cd)),
      lambda cd: (lambda h, w: K.lm_head_loss(h, w, targets, weights, compute_dtype=cd))).items():
    results[dname] = run_group(f"LM head + loss N={n} D={d} V={v} (tied), {dname}", variants,
                               (h, w), 2 * n * d * v, reps)
  return results


def hlo_report():
  """Where each dot of the kernels' fwd+bwd runs, with native bf16 dots."""
  print("\nHLO: dots of fwd+bwd with BF16_DOTS='native', compute bf16 "
        "(ynn = inside a YNNPACK fusion, the fast path; eigen = standalone DotThunk)")
  x = jnp.ones((2048, 384), F32)
  w = jnp.ones((384, 1536), F32)
  q, k, v, seg, prefix = attention_inputs(8, 256, 6, 6, 64)
  hh, we = jnp.ones((2048, 384), F32), jnp.ones((8192, 384), F32)
  tg, wt = jnp.zeros((2048,), jnp.int32), jnp.ones((2048,), F32)
  cases = {
      "dense": (lambda x, w: K.dense(x, w, BF16), (x, w), (0, 1)),
      "dense_reference": (lambda x, w: K.dense_reference(x, w, BF16), (x, w), (0, 1)),
      "attention": (lambda q, k, v: K.attention(q, k, v, seg, prefix, compute_dtype=BF16),
                    (q, k, v), (0, 1, 2)),
      "lm_head_loss": (lambda h, w: K.lm_head_loss(h, w, tg, wt, compute_dtype=BF16),
                       (hh, we), (0, 1)),
      "lm_head_loss_reference": (
          lambda h, w: K.lm_head_loss_reference(h, w, tg, wt, compute_dtype=BF16),
          (hh, we), (0, 1)),
  }
  for name, (f, args, argnums) in cases.items():
    txt = jax.jit(with_mode("native", grad_fn(f, argnums))).lower(*args).compile().as_text()
    print(f"  {name:24s} {summarise_dots(txt)}")


def summarise_dots(hlo_text: str) -> str:
  """Counts the dots of compiled HLO by where they run and their operand dtypes.

  'ynn' = inside a YNNPACK fusion (XLA:CPU's fast dot path); 'eigen' = a standalone dot
  (DotThunk).  A bf16 model whose dots show up as 'eigen f32,f32' was rewritten to
  convert + float32 dot: off the bf16 fast path.
  """
  comps, cur = {}, None
  for line in hlo_text.splitlines():
    s = line.strip()
    if s.endswith("{") and "(" in s and not s.startswith("ROOT"):
      words = s.split()
      cur = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      comps[cur] = {"lines": [], "types": {}}
      for param in s[s.index("(") + 1:s.rindex(")")].split(", "):
        if ":" in param:
          name, typ = param.split(":", 1)
          comps[cur]["types"][name.strip().lstrip("%")] = typ.strip().split("[")[0]
    elif cur is not None and " = " in s:
      name, rest = s.split(" = ", 1)
      name = name.replace("ROOT", "").strip().lstrip("%")
      comps[cur]["types"][name] = rest.split("[")[0].strip()
      comps[cur]["lines"].append(s)
  ynn_calls = set()
  for comp in comps.values():
    for s in comp["lines"]:
      if "__ynn_fusion" in s and "calls=%" in s:
        ynn_calls.add(s.split("calls=%")[1].split(",")[0].split()[0])
  counts = {}
  for cname, comp in comps.items():
    for s in comp["lines"]:
      if " dot(" not in s:
        continue
      ops = [o.strip().lstrip("%") for o in s.split(" dot(")[1].split(")")[0].split(",")]
      in_types = ",".join(comp["types"].get(o, "?") for o in ops)
      out_type = s.split(" = ", 1)[1].split("[")[0].strip()
      key = f"{'ynn' if cname in ynn_calls else 'eigen'} {in_types}->{out_type}"
      counts[key] = counts.get(key, 0) + 1
  return "; ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def step_estimate(dense_r, attn_r, head_r):
  """Kernel-only estimate of the bench training step (no norms, GELU, embedding, AdamW).

  Each component is converted with its own paired xDOT ratio into the FLOP the dot
  would have done in its time, so components measured while the machine ran at
  different speeds add up consistently; utilisation = FLOP / sum of those.
  """
  print("\nKernel-only estimate of one bench training step, as a fraction of the f32 "
        "2048^2 dot\n(6 layers x (qkv, out, mlp up, mlp down, attention) + LM head, "
        "fwd+bwd; excludes norms, GELU, residual adds, embedding gather and AdamW):")
  layers, tokens = 6, 2048
  per_layer = ("qkv 384->1152", "attn out 384->384", "mlp up 384->1536", "mlp down 1536->384")
  flop_total = (layers * sum(6 * tokens * d * f for d, f in ((384, 1152), (384, 384), (384, 1536), (1536, 384)))
                + layers * 12 * 8 * 256 * 256 * 384 + 6 * tokens * 384 * 8192)
  flops = {"dense": {label: 6 * tokens * d * f for label, (d, f) in zip(
      per_layer, ((384, 1152), (384, 384), (384, 1536), (1536, 384)))},
      "attention": 12 * 8 * 256 * 256 * 384, "head": 6 * tokens * 384 * 8192}
  for dname, keys in (("float32", ["plain", "kernel"]),
                      ("bf16", ["plain", "kernel[native bf16 dots]", "kernel[f32 dots]"])):
    for key in keys:
      # "DOT-FLOP": each component's FLOP divided by its paired xDOT ratio, i.e. the FLOP
      # the reference dot would have done in the same time.
      parts = {"dense": 0.0}
      for label in per_layer:
        rows, _ = dense_r[(label, dname)]
        parts["dense"] += layers * flops["dense"][label] / rows[f"{key} fwd+bwd"][2]
      if (8, 256, "causal", dname) in attn_r:
        rows, _ = attn_r[(8, 256, "causal", dname)]
        parts["attention"] = layers * flops["attention"] / rows[f"{key} fwd+bwd"][2]
      rows, _ = head_r[dname]
      parts["head"] = flops["head"] / rows[f"{key} fwd+bwd"][2]
      total = sum(parts.values())
      shares = ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items())
      print(f"  {dname:8s} {key:26s} {flop_total / total:5.2f} xDOT   time shares: {shares}")


def main():
  parser = bench.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=bench.positive_int, default=5)
  parser.add_argument("--long", action="store_true", help="attention at T=1024, 2048 too")
  parser.add_argument("--hlo", action="store_true", help="report where the dots run")
  parser.add_argument("--only", default="dense,attention,head", help="comma list")
  args = parser.parse_args()
  unknown = set(args.only.split(",")) - {"dense", "attention", "head"}
  if unknown:
    parser.error(f"--only={args.only}: unknown {sorted(unknown)} (expected a comma list of "
                 "dense, attention, head)")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, CPU: {cpu_summary()}")
  print(f"load average at start: {os.getloadavg()}")
  print(f"BF16_DOTS={K.BF16_DOTS!r} -> native bf16 dots: {K.bf16_dots_native()}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  only = set(args.only.split(","))
  dense_r = bench_dense(args.reps) if "dense" in only else None
  attn_r = None
  if "attention" in only:
    configs = [(8, 256, 6, 6, 64, "causal"), (8, 256, 6, 2, 64, "prefix")]
    if args.long:
      configs += [(2, 1024, 6, 6, 64, "causal"), (1, 2048, 6, 6, 64, "causal")]
    attn_r = bench_attention(args.reps, configs)
  head_r = bench_head(args.reps) if "head" in only else None
  if dense_r and attn_r and head_r:
    step_estimate(dense_r, attn_r, head_r)
  if args.hlo:
    hlo_report()
  print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
  common.exit_on_user_error(main)()
