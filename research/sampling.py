"""Text generation.

`greedy_uncached` re-runs the whole sequence for every new token: simple and
obviously correct, used for the few samples printed during training and as the
reference the cached decoder is tested against.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from research import model as model_lib


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


def greedy_texts(params, cfg, tokenizer, prompts, max_new_tokens: int) -> list[str]:
  """Greedy continuations of text prompts, decoded (stops at the first eos)."""
  encoded = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
  p = max(len(e) for e in encoded)
  prompt = np.zeros((len(encoded), p), np.int32)
  for i, e in enumerate(encoded):
    prompt[i, :len(e)] = e
  lengths = np.asarray([len(e) for e in encoded], np.int32)
  out = np.asarray(greedy_uncached(params, prompt, lengths, cfg=cfg,
                                   max_new_tokens=max_new_tokens))
  texts = []
  for i, n in enumerate(lengths):
    new = list(out[i, n:n + max_new_tokens])
    if tokenizer.eos_id in new:
      new = new[:new.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode(new))
  return texts
