"""Text generation: cached decoding, fill-mask, and the uncached reference.

`generate` decodes with a KV cache, the whole loop inside jit:

  prefill   one forward pass over the prompts writes their keys/values into the cache
            and gives the logits of each prompt's last token;
  decode    a `lax.while_loop` samples a token per row, feeds it back as a B×1 chunk
            and stops when every row has emitted eos or after `max_new_tokens`.

Cache layout (left padding). Prompts come in left-aligned (`prompt_BxP`, pads after
each prompt, as `greedy_uncached` and the data pipeline write them) and are moved to
the right end of P slots, so every row writes its t-th new token to the same slot
P + t: one in-place `dynamic_update_slice` for the whole batch, no per-row scatter.
The pads in front get segment id 0 and are never attended. Rope (or learned) positions
are the real token positions, 0 at each prompt's first token, so a row decodes the
same tokens in any batch as alone (up to float rounding of masked keys).

Shapes are static: the cache has P + max_new_tokens - 1 slots, outputs have
max_new_tokens columns; rows that finished keep stepping in lockstep and their outputs
are masked. Everything is a pure function of (params, arrays, rng), so PPO can call
`generate` inside its own jitted step, and sharded params work unchanged (jit
propagates their shardings; there is no device-specific code).

Log-probabilities: `Generation.logprobs_BxN` is log softmax of the model's *raw*
logits (temperature 1, no top-k / top-p) at the sampled token, i.e. log pi(token) of
the policy as PPO defines it, whatever the sampling settings were. For sampling
with temperature != 1 or filtering, that is not the probability the token was drawn
with.

`greedy_uncached` re-runs the whole sequence for every new token: simple and
obviously correct, used for the few samples printed during training and as the
reference the cached decoder is tested against.
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from research import model as model_lib


@flax.struct.dataclass
class Generation:
  """What `generate` returns (N = max_new_tokens).

  tokens_BxN: the new tokens; `pad_id` after a row's eos.
  logprobs_BxN: log pi(token) under the model at temperature 1 (see module doc); 0 where
    not valid.
  valid_BxN: True for generated tokens up to and including eos (PPO's loss mask).
  done_B: True if the row emitted eos (False: cut at max_new_tokens).
  lengths_B: number of valid tokens per row.
  """
  tokens_BxN: jax.Array
  logprobs_BxN: jax.Array
  valid_BxN: jax.Array
  done_B: jax.Array
  lengths_B: jax.Array


def right_align(prompt_BxP, lengths_B, pad_id=0):
  """Left-aligned prompts (pads after) -> right-aligned (pads before), same P."""
  b, p = prompt_BxP.shape
  shift_B = p - lengths_B  # pads in front of each row
  src_BxP = jnp.arange(p)[None, :] - shift_B[:, None]
  rolled = jnp.take_along_axis(prompt_BxP, jnp.clip(src_BxP, 0, p - 1), axis=1)
  return jnp.where(src_BxP >= 0, rolled, pad_id)


def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
  """Logits outside the top-k and outside the top-p nucleus set to -inf.

  top_k=0 / top_p=1 switch a filter off. The nucleus is the smallest set of most likely
  tokens whose probability reaches top_p (the most likely token is always kept), taken
  after top-k as in Hugging Face. Tokens tied with the last kept logit are kept too.
  """
  if top_k and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.sum(mass_before_BxV < top_p, axis=-1)
    last_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < last_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def sample_logits(rng, logits_BxV, temperature=1.0, top_k: int = 0, top_p: float = 1.0):
  """-> (token_B, log pi(token_B) at temperature 1). temperature <= 0 is greedy.

  `temperature` may be traced (one compiled program serves greedy and sampling);
  `top_k` and `top_p` are static.
  """
  greedy = temperature <= 0
  tempered_BxV = logits_BxV / jnp.where(greedy, 1.0, temperature)
  sampled_B = jax.random.categorical(rng, filter_logits(tempered_BxV, top_k, top_p), axis=-1)
  token_B = jnp.where(greedy, jnp.argmax(logits_BxV, axis=-1), sampled_B).astype(jnp.int32)
  log_z_B = jax.nn.logsumexp(logits_BxV, axis=-1)
  logprob_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0] - log_z_B
  return token_B, logprob_B


def unrolled(params, cfg):
  """(params, cfg) with the layers unrolled, as decoding wants them (see `KVCache`).

  Inside a scan over layers XLA dynamic-slices (copies) each layer's weights and cache
  at every step, which doubles a decode step's memory traffic; unstacked once before
  the decode loop, every step reads them in place (at the price of a compile that grows
  with depth).
  """
  if not cfg.scan_layers:
    return params, cfg
  return (model_lib.unstack_layers(params, cfg.num_layers),
          dataclasses.replace(cfg, scan_layers=False))


def _apply(params, cfg, tokens, positions, segment_ids, prefix, cache):
  hidden_BxLxD, _, cache = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens, positions, segment_ids, prefix, cache=cache)
  return hidden_BxLxD, cache


def prefill(params, prompt_BxP, lengths_B, *, cfg, cache_len: int,
            bidirectional_prompt=False):
  """Writes left-aligned prompts, right-aligned, into a fresh cache of `cache_len` slots.

  Returns (logits B×V of each prompt's last token, cache); the next token of every row
  goes to slot P. With `bidirectional_prompt` the prompt tokens are prefix tokens (see
  model.py), as a prefix-LM was trained to read them.
  """
  b, p = prompt_BxP.shape
  pads_Bx1 = (p - lengths_B)[:, None]
  slot_BxP = jnp.broadcast_to(jnp.arange(p), (b, p))
  positions_BxP = jnp.maximum(slot_BxP - pads_Bx1, 0)
  segment_ids_BxP = (slot_BxP >= pads_Bx1).astype(jnp.int32)
  prefix_BxP = (segment_ids_BxP > 0) & bidirectional_prompt
  cache = model_lib.init_cache(cfg, b, cache_len)
  hidden_BxPxD, cache = _apply(params, cfg, right_align(prompt_BxP, lengths_B), positions_BxP,
                               segment_ids_BxP, prefix_BxP, cache)
  logits_BxV = model_lib.logits(params, hidden_BxPxD[:, -1:], cfg.compute_dtype)[:, 0]
  return logits_BxV, cache


def decode_step(params, token_B, position_B, cache, *, cfg):
  """Feeds one token per row at slot `cache.index` -> (next-token logits B×V, cache)."""
  b = token_B.shape[0]
  hidden_Bx1xD, cache = _apply(params, cfg, token_B[:, None], position_B[:, None],
                               jnp.ones((b, 1), jnp.int32), jnp.zeros((b, 1), bool), cache)
  return model_lib.logits(params, hidden_Bx1xD, cfg.compute_dtype)[:, 0], cache


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'top_k', 'top_p',
                                             'bidirectional_prompt'))
def generate(params, prompt_BxP, lengths_B, rng, *, cfg, max_new_tokens: int, eos_id,
             pad_id=0, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
             bidirectional_prompt: bool = False) -> Generation:
  """Samples up to `max_new_tokens` after each prompt, with a KV cache, inside jit.

  Args:
    params: model params (any shardings).
    prompt_BxP: int prompts, left-aligned (pads after each prompt).
    lengths_B: prompt lengths, each >= 1.
    rng: key; step t draws with fold_in(rng, t), so a seed fixes the samples.
    cfg: the model's TransformerConfig.
    max_new_tokens: N, the number of output columns.
    eos_id: a row stops after emitting it (-1: never stop).
    pad_id: written after a row's eos.
    temperature: 0 is greedy (argmax of the raw logits; top-k / top-p ignored).
      eos_id, pad_id and temperature are traced: changing them does not recompile.
    top_k, top_p: static filters applied after temperature (`filter_logits`); 0 / 1.0 =
      off.
    bidirectional_prompt: read the prompt bidirectionally (prefix-LM checkpoints).

  Returns:
    `Generation`; its log-probs are the model's at temperature 1 (module doc).
  """
  b, p = prompt_BxP.shape
  n = max_new_tokens
  if cfg.position == 'learned' and p + n - 1 > cfg.max_len:
    raise ValueError(f'{p} prompt + {n} new tokens exceed the {cfg.max_len} learned positions')
  lengths_B = lengths_B.astype(jnp.int32)
  params, cfg = unrolled(params, cfg)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  logits_BxV, cache = prefill(params, prompt_BxP.astype(jnp.int32), lengths_B, cfg=cfg,
                              cache_len=p + n - 1, bidirectional_prompt=bidirectional_prompt)
  token_B, logprob_B = sample(jax.random.fold_in(rng, 0), logits_BxV)
  out = Generation(tokens_BxN=jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token_B),
                   logprobs_BxN=jnp.zeros((b, n), jnp.float32).at[:, 0].set(logprob_B),
                   valid_BxN=jnp.zeros((b, n), bool).at[:, 0].set(True),
                   done_B=token_B == eos_id, lengths_B=jnp.ones((b,), jnp.int32))

  def keep_going(carry):
    t, _, _, out = carry
    return (t < n) & ~jnp.all(out.done_B)

  def step(carry):
    t, token_B, cache, out = carry  # token t-1 is fed; token t is sampled
    logits_BxV, cache = decode_step(params, token_B, lengths_B + t - 1, cache, cfg=cfg)
    token_B, logprob_B = sample(jax.random.fold_in(rng, t), logits_BxV)
    live_B = ~out.done_B
    token_B = jnp.where(live_B, token_B, pad_id)
    out = Generation(
        tokens_BxN=out.tokens_BxN.at[:, t].set(token_B),
        logprobs_BxN=out.logprobs_BxN.at[:, t].set(jnp.where(live_B, logprob_B, 0.0)),
        valid_BxN=out.valid_BxN.at[:, t].set(live_B),
        done_B=out.done_B | (live_B & (token_B == eos_id)),
        lengths_B=out.lengths_B + live_B)
    return t + 1, token_B, cache, out

  _, _, _, out = jax.lax.while_loop(keep_going, step, (jnp.int32(1), token_B, cache, out))
  return out


def _fill_logits(params, tokens_BxL, lengths_B, cfg, bidirectional, shift):
  """Logits predicting each position from one pass over the texts (real tokens only)."""
  b, l = tokens_BxL.shape
  positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
  segment_ids_BxL = (positions_BxL < lengths_B[:, None]).astype(jnp.int32)
  hidden_BxLxD, _ = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxL, positions_BxL, segment_ids_BxL,
      (segment_ids_BxL > 0) & bidirectional)
  if shift:  # next-token heads (hybrid MNTP, causal LMs): position i-1 predicts token i.
    hidden_BxLxD = jnp.concatenate([hidden_BxLxD[:, :1], hidden_BxLxD[:, :-1]], axis=1)
  return model_lib.logits(params, hidden_BxLxD, cfg.compute_dtype)


@functools.partial(jax.jit, static_argnames=('cfg', 'mask_id', 'suppress_ids', 'iterative',
                                             'bidirectional', 'shift'))
def fill_mask(params, tokens_BxL, lengths_B, *, cfg, mask_id: int, suppress_ids=(),
              iterative: bool = False, bidirectional: bool = True, shift: bool = False):
  """Replaces every `mask_id` token with the model's most likely token.

  One pass (`iterative=False`): all masks are predicted at once from the masked text.
  Iterative: each pass fills only the most confident remaining mask of each row (the
  highest top-token probability) and re-reads the text, until no mask is left.

  Args:
    params, cfg: the model.
    tokens_BxL: left-aligned texts containing `mask_id`; positions >= length are padding.
    lengths_B: text lengths.
    suppress_ids: ids never predicted (the tokenizer's special ids, mask_id always).
    iterative: most confident mask first, one per pass, instead of all in one pass.
    bidirectional: attention over the whole text (masked / hybrid objectives); False
      reads the left context only (causal LMs, with `shift`).
    shift: predict token i from position i-1 (the hybrid objective's MNTP head and any
      next-token model); a mask at position 0 then reads position 0 itself.

  Returns:
    (filled tokens B×L, log-prob of each filled token B×L, 0 elsewhere).
  """
  lengths_B = lengths_B.astype(jnp.int32)
  banned_V = jnp.zeros((cfg.vocab_size,), bool).at[jnp.asarray((mask_id, *suppress_ids))]
  banned_V = banned_V.set(True)

  def predict(tokens_BxL):
    logits_BxLxV = _fill_logits(params, tokens_BxL, lengths_B, cfg, bidirectional, shift)
    logp_BxLxV = jax.nn.log_softmax(jnp.where(banned_V, -jnp.inf, logits_BxLxV), axis=-1)
    return jnp.argmax(logp_BxLxV, axis=-1).astype(tokens_BxL.dtype), jnp.max(logp_BxLxV, -1)

  is_mask_BxL = (tokens_BxL == mask_id) & (jnp.arange(tokens_BxL.shape[1]) < lengths_B[:, None])
  if not iterative:
    best_BxL, logp_BxL = predict(tokens_BxL)
    return jnp.where(is_mask_BxL, best_BxL, tokens_BxL), jnp.where(is_mask_BxL, logp_BxL, 0.0)

  def step(carry):
    tokens_BxL, logps_BxL, todo_BxL = carry
    best_BxL, logp_BxL = predict(tokens_BxL)
    pick_B = jnp.argmax(jnp.where(todo_BxL, logp_BxL, -jnp.inf), axis=-1)
    pick_BxL = (jnp.arange(tokens_BxL.shape[1]) == pick_B[:, None]) & todo_BxL
    return (jnp.where(pick_BxL, best_BxL, tokens_BxL), jnp.where(pick_BxL, logp_BxL, logps_BxL),
            todo_BxL & ~pick_BxL)

  tokens_BxL, logps_BxL, _ = jax.lax.while_loop(
      lambda carry: jnp.any(carry[2]), step,
      (tokens_BxL, jnp.zeros(tokens_BxL.shape, jnp.float32), is_mask_BxL))
  return tokens_BxL, logps_BxL


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens'))
def greedy_uncached(params, prompt_BxP, prompt_lengths_B, *, cfg, max_new_tokens):
  """Greedy continuation of left-aligned prompts (pad after each prompt's length).

  Returns tokens B×(P+max_new_tokens): each prompt followed by its continuation.
  """
  b, p = prompt_BxP.shape
  total = p + max_new_tokens
  model = model_lib.Transformer(cfg)
  tokens = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_BxP)
  positions = jnp.broadcast_to(jnp.arange(total), (b, total))
  segment_ids = jnp.ones((b, total), jnp.int32)
  prefix = jnp.zeros((b, total), bool)

  def step(i, tokens):
    hidden, _ = model.apply({'params': params}, tokens, positions, segment_ids, prefix)
    last = prompt_lengths_B + i - 1  # the position whose output predicts the next token
    h_BxD = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits_BxV = model_lib.logits(params, h_BxD[:, None], cfg.compute_dtype)[:, 0]
    next_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return tokens.at[jnp.arange(b), last + 1].set(next_B)

  return jax.lax.fori_loop(0, max_new_tokens, step, tokens)


def encode_prompts(tokenizer, prompts, fallback_id=None, encode=None):
  """Texts -> (left-aligned int32 prompts B×P, lengths B); an empty text -> [fallback].

  Prompts are text (`encode` defaults to `tokenizer.encode_text`: a literal "<mask>"
  or "<|user|>" is spelled in byte pieces, never a reserved id; research/tokenizer.py's
  text policy). Raises ValueError for a prompt that is not valid Unicode.
  """
  fallback_id = tokenizer.eos_id if fallback_id is None else fallback_id
  encode = tokenizer.encode_text if encode is None else encode
  encoded = [encode(p) or [fallback_id] for p in prompts]
  prompt = np.zeros((len(encoded), max(len(e) for e in encoded)), np.int32)
  for i, e in enumerate(encoded):
    prompt[i, :len(e)] = e
  return prompt, np.asarray([len(e) for e in encoded], np.int32)


def greedy_texts(params, cfg, tokenizer, prompts, max_new_tokens: int) -> list[str]:
  """Greedy continuations of text prompts, decoded (stops at the first eos)."""
  prompt, lengths = encode_prompts(tokenizer, prompts)
  out = np.asarray(greedy_uncached(params, prompt, lengths, cfg=cfg,
                                   max_new_tokens=max_new_tokens))
  texts = []
  for i, n in enumerate(lengths):
    new = list(out[i, n:n + max_new_tokens])
    if tokenizer.eos_id in new:
      new = new[:new.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode(new))
  return texts


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'top_k', 'top_p'))
def _generate_jit(params, prompt_BxP, lengths_B, rng, eos_id, temperature, *, cfg,
                  max_new_tokens, top_k, top_p):
  return generate(params, prompt_BxP, lengths_B, rng, cfg=cfg, max_new_tokens=max_new_tokens,
                  eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p)


def complete(params, cfg, prompt_ids, *, max_new_tokens: int, eos_id: int,
             batch_size: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """KV-cached completions of many token prompts, in batches; each output ends at (and
  includes) eos_id when reached. Prompts longer than the context keep their last tokens.

  Batches are padded to `batch_size` rows and prompts to a multiple of 32 columns, so a
  whole evaluation compiles a handful of times, not once per batch.
  """
  limit = cfg.max_len - max_new_tokens if cfg.position == 'learned' else None
  prompts = [list(p)[-limit:] if limit else list(p) for p in prompt_ids]
  outputs = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    width = -(-max(len(p) for p in chunk) // 32) * 32
    prompt = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    for i, p in enumerate(chunk):
      prompt[i, :len(p)] = p
      lengths[i] = len(p)
    out = _generate_jit(params, prompt, lengths, jax.random.key(seed + start), eos_id,
                        temperature, cfg=cfg, max_new_tokens=max_new_tokens, top_k=top_k,
                        top_p=top_p)
    tokens, n = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    outputs.extend(list(map(int, tokens[i, :n[i]])) for i in range(len(chunk)))
  return outputs
