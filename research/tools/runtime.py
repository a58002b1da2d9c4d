"""Decoding with tool calls: stop at `<|/tool_call|>`, run the tool, inject, resume.

`generate_with_tools` decodes a batch with a KV cache, from a host-side loop over two
jitted functions:

  prefill   the prompts, once (`sampling.prefill`: right-aligned, real positions);
  step      a B×W chunk per row through the cached forward (`Transformer` with `cache`),
            written at slots [cache.index, cache.index + W), and one sampled token per
            row from the logits of that row's last real token in the chunk.

Each step every decoding row feeds its one new token (W = 1). When a row samples
`<|/tool_call|>`, its call (the text since the last `<|tool_call|>`, in the prompt or
the output) is handed to a thread pool and the row waits; the other rows keep
decoding. When the result is back, the row's next chunk is its unfed
`<|/tool_call|>` followed by the result block

  <|end_of_turn|><|tool_result|> result <|/tool_result|><|assistant|>

exactly what `chat.render` writes for [assistant with tool_calls, tool message, next
assistant turn], so a model fine-tuned on rendered tool conversations reads its own
format. Only those tokens are written into the existing cache (W = the block padded up
to a power of two, the pads are segment-0 slots no token attends); the context before
them is never re-fed. The logits of the block's last token give the row's next token
in the same step, so injecting costs no extra step.

Rows are independent: a row's chunk is its own tokens at its own positions (rope /
learned positions are real token positions), and attention is by segment and
position, not by slot (`kernels.attention_mask`), so idle rows (waiting on a tool,
finished) write padding slots and every row decodes what it would decode alone, up to
float rounding of masked keys. The cache starts with P + max_new_tokens + max_calls·W
slots and doubles (recompiling) when the idle and padding slots use it up.

Bounds: at most `max_calls` calls per row per turn (a further call is answered with an
error without running the tool), results cut to `max_result_chars` characters and
`max_result_tokens` tokens, each tool call limited to `tool_timeout_s` seconds
(`registry.run_call`), and `max_new_tokens` sampled tokens per row (injected tokens do
not count).

Cost: one host round trip per token, slower than `sampling.generate`'s in-jit loop;
it is meant for chat and tool-use evaluation, not for PPO rollouts at scale.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research import model as model_lib
from research import sampling
from research import tokenizer as tokenizer_lib
from research.tools import registry

_IDS = tokenizer_lib.CHAT_IDS
TOOL_CALL, TOOL_CALL_END = _IDS["tool_call"], _IDS["tool_call_end"]
RESULT_PREFIX = (_IDS["end_of_turn"], _IDS["tool_result"])
RESULT_SUFFIX = (_IDS["tool_result_end"], _IDS["assistant"])
# A call's text starts after the last <|tool_call|> of the current turn; these end a turn.
_TURN_BOUNDARIES = frozenset((_IDS["system"], _IDS["user"], _IDS["assistant"],
                              _IDS["end_of_turn"], _IDS["tool_result"], _IDS["tool_result_end"],
                              TOOL_CALL_END))
_MIN_CHUNK = 32
_SLOT_ROUND = 64
_PROMPT_ROUND = 32


@dataclasses.dataclass
class ToolGeneration:
  """What `generate_with_tools` returns, one entry per row (Python lists: rows differ).

  tokens: the continuation after the prompt: sampled tokens and injected result blocks,
    in order (so prompt + tokens is the whole context the model read).
  sampled: bool [len(tokens)] per row, True for tokens the model produced.
  logprobs: float32 [len(tokens)] per row, log pi(token) at temperature 1 for sampled
    tokens (as `sampling.Generation`), 0 for injected ones.
  calls: the row's `registry.CallResult`s, in order.
  finish: 'eos' (sampled eos_id), 'length' (max_new_tokens sampled) or 'context' (the
    next chunk would pass a learned-position model's max_len).
  injected: int64 [B], result-block tokens written into the cache per row.
  fed: int64 [B], positions written into the cache per row in all (prompt included):
    len(prompt) + len(tokens) - 1, the last sampled token never being fed.
  steps: device steps after the prefill.
  cache_slots: the cache's final number of slots.
  """
  tokens: list[list[int]]
  sampled: list[np.ndarray]
  logprobs: list[np.ndarray]
  calls: list[list[registry.CallResult]]
  finish: list[str]
  injected: np.ndarray
  fed: np.ndarray
  steps: int
  cache_slots: int


def _pick(logits_BxV, forced_B, rng, temperature, top_k, top_p):
  token_B, _ = sampling.sample_logits(rng, logits_BxV, temperature, top_k, top_p)
  token_B = jnp.where(forced_B >= 0, forced_B, token_B).astype(jnp.int32)
  logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=('cfg', 'cache_len', 'top_k', 'top_p'))
def _prefill(params, prompt_BxP, lengths_B, forced_B, rng, temperature, *, cfg, cache_len,
             top_k, top_p):
  """-> (token B, log-prob B, cache): prompts written, first token picked."""
  logits_BxV, cache = sampling.prefill(params, prompt_BxP, lengths_B, cfg=cfg,
                                       cache_len=cache_len)
  return (*_pick(logits_BxV, forced_B, rng, temperature, top_k, top_p), cache)


@functools.partial(jax.jit, static_argnames=('cfg', 'top_k', 'top_p'), donate_argnums=(1,))
def _step(params, cache, tokens_BxW, positions_BxW, segment_ids_BxW, last_B, forced_B, rng,
          step, temperature, *, cfg, top_k, top_p):
  """One chunk per row through the cached forward -> (token B, log-prob B, cache).

  tokens_BxW, positions_BxW, segment_ids_BxW: int32; each row's real tokens left-aligned
    at their real positions with segment id 1, then pads (segment id 0, never attended).
    The chunk is written at cache slots [cache.index, cache.index + W).
  last_B: int32, column of each row's last real token (its logits pick the next token).
  forced_B: int32, a token to take instead of sampling, or -1.
  rng, step: the sample is drawn with fold_in(rng, step).
  """
  hidden_BxWxD, _, cache = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxW, positions_BxW, segment_ids_BxW,
      jnp.zeros(tokens_BxW.shape, bool), cache=cache)
  h_Bx1xD = jnp.take_along_axis(hidden_BxWxD, last_B[:, None, None], axis=1)
  logits_BxV = model_lib.logits(params, h_Bx1xD, cfg.compute_dtype)[:, 0]
  return (*_pick(logits_BxV, forced_B, jax.random.fold_in(rng, step), temperature, top_k,
                 top_p), cache)


def grow_cache(cache: model_lib.KVCache, num_slots: int) -> model_lib.KVCache:
  """`cache` with empty slots (segment 0) appended up to `num_slots` slots."""
  extra = num_slots - cache.positions_BxS.shape[1]
  if extra <= 0:
    return cache
  pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
  # Layer caches are [layers×]B×K×S×H: slots are the second axis from the end.
  layers = jax.tree.map(lambda x: pad(x, x.ndim - 2), cache.layers)
  return cache.replace(layers=layers, positions_BxS=pad(cache.positions_BxS, 1),
                       segment_ids_BxS=pad(cache.segment_ids_BxS, 1),
                       prefix_BxS=pad(cache.prefix_BxS, 1))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _chunk_width(n: int, max_width: int) -> int:
  """1 for decoding; else the next power of two >= n (at least _MIN_CHUNK), capped.

  Few widths, few compiles (each (width, cache slots) pair compiles `_step` once).
  """
  if n == 1:
    return 1
  w = _MIN_CHUNK
  while w < n:
    w *= 2
  return min(w, max_width)


def call_text(tokenizer, sequence: Sequence[int]) -> str | None:
  """The text of the call closed by `sequence`'s final `<|/tool_call|>`, or None.

  It is the decoded tokens after the last `<|tool_call|>` of the current turn; None if
  no `<|tool_call|>` opens it (a boundary token or the start comes first).
  """
  for i in range(len(sequence) - 2, -1, -1):
    if sequence[i] == TOOL_CALL:
      return tokenizer.decode(sequence[i + 1:-1])
    if sequence[i] in _TURN_BOUNDARIES:
      return None
  return None


def result_block(tokenizer, result: str, max_result_tokens: int) -> list[int]:
  """The injected ids: RESULT_PREFIX, the result as plain text (cut), RESULT_SUFFIX."""
  return [*RESULT_PREFIX, *tokenizer.encode_text(result)[:max_result_tokens], *RESULT_SUFFIX]


def generate_with_tools(
    params, cfg: model_lib.TransformerConfig, tokenizer,
    prompts: Sequence[Sequence[int]], tools: Mapping[str, registry.Tool], *,
    max_new_tokens: int, eos_id: int = _IDS["end_of_turn"], temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_calls: int = 4,
    max_result_chars: int = 1000, max_result_tokens: int = 256,
    tool_timeout_s: float | None = 10.0, max_workers: int = 4,
    force: Callable[[int, list[int]], int | None] | None = None,
    cache_len: int | None = None) -> ToolGeneration:
  """Samples continuations of `prompts`, running the tools the model calls on the way.

  Args:
    params, cfg: a causal model (scanned params are unrolled here, as for decoding).
    tokenizer: `encode_text` / `decode` (research/tokenizer.Tokenizer).
    prompts: B token-id lists, each non-empty; typically `chat.render(...,
      add_generation_prompt=True).ids`. A prompt may end inside an open
      `<|tool_call|>`: the call's text then starts in the prompt.
    tools: name -> `registry.Tool` (e.g. `registry.default_tools()`).
    max_new_tokens: sampled tokens per row at most (injected tokens not counted).
    eos_id: a row stops after sampling it (default `<|end_of_turn|>`; -1: never).
    temperature, top_k, top_p: as `sampling.sample_logits` (temperature <= 0: greedy).
    seed: step t samples with fold_in(key(seed), t).
    max_calls: tool calls run per row; a further call gets an error result instead.
    max_result_chars, max_result_tokens: a result is cut to these bounds.
    tool_timeout_s: wall-clock limit of one tool function (None: none).
    max_workers: tool calls run at once (threads; the python tool runs a subprocess).
    force: optional `force(row, tokens_so_far) -> token id | None`, asked before each of
      the row's samples (tokens_so_far: the row's continuation); a returned id replaces
      the sampled one (its log-prob is still the model's). For scripted tests and
      constrained decoding.
    cache_len: initial cache slots (default P + max_new_tokens + max_calls · widest chunk,
      rounded up to 64; at least the prompts); the cache grows when needed.

  Returns:
    `ToolGeneration`.

  Raises:
    ValueError: an empty prompt, no prompts, or a learned-position model whose max_len
      the prompts already exceed.
  """
  b = len(prompts)
  if b == 0 or any(len(p) == 0 for p in prompts):
    raise ValueError("generate_with_tools needs at least one prompt, none empty")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  p = _round_up(int(lengths.max()), _PROMPT_ROUND)  # few prompt shapes: few compiles
  max_pos = cfg.max_len if cfg.position == 'learned' else None
  if max_pos is not None and lengths.max() > max_pos:
    raise ValueError(f"a {lengths.max()}-token prompt exceeds the model's {max_pos} learned "
                     "positions")
  prompt_BxP = np.zeros((b, p), np.int32)
  for i, prompt in enumerate(prompts):
    prompt_BxP[i, :len(prompt)] = prompt
  params, cfg = sampling.unrolled(params, cfg)
  max_width = _round_up(1 + len(RESULT_PREFIX) + max_result_tokens + len(RESULT_SUFFIX), 8)
  slots = cache_len or _round_up(p + max_new_tokens + max_calls * max_width, _SLOT_ROUND)
  slots = max(slots, _round_up(p + max_width, _SLOT_ROUND))
  rng = jax.random.key(seed)
  sample_args = dict(top_k=top_k, top_p=top_p)
  temperature = jnp.float32(temperature)

  seqs = [list(map(int, prompt)) for prompt in prompts]  # prompt + continuation
  tokens = [[] for _ in range(b)]
  sampled = [[] for _ in range(b)]
  logprobs = [[] for _ in range(b)]
  calls = [[] for _ in range(b)]
  finish = [''] * b
  feed = [[] for _ in range(b)]  # tokens to write at the row's next step
  pos = lengths.astype(np.int64).copy()  # next position of each row
  injected = np.zeros(b, np.int64)
  num_sampled = np.zeros(b, np.int64)
  waiting: dict[int, concurrent.futures.Future] = {}

  def forced(rows) -> np.ndarray:
    """-1, or the token `force` imposes, for each row about to sample."""
    out = np.full(b, -1, np.int32)
    for r in rows if force is not None else ():
      token = force(r, list(tokens[r]))
      out[r] = -1 if token is None else int(token)
    return out

  def inject(r: int, call: registry.CallResult):
    calls[r].append(call)
    block = result_block(tokenizer, call.result, max_result_tokens)
    if max_pos is not None and pos[r] + 1 + len(block) > max_pos:
      finish[r] = 'context'
      return
    tokens[r] += block
    sampled[r] += [False] * len(block)
    logprobs[r] += [0.0] * len(block)
    seqs[r] += block
    injected[r] += len(block)
    feed[r] = [TOOL_CALL_END] + block

  def take(r: int, token: int, logprob: float, pool):
    tokens[r].append(token)
    sampled[r].append(True)
    logprobs[r].append(logprob)
    seqs[r].append(token)
    num_sampled[r] += 1
    if token == eos_id:
      finish[r] = 'eos'
    elif num_sampled[r] >= max_new_tokens:
      finish[r] = 'length'
    elif max_pos is not None and pos[r] + 1 > max_pos:
      finish[r] = 'context'
    elif token == TOOL_CALL_END:
      text = call_text(tokenizer, seqs[r])
      if text is None:
        inject(r, registry.CallResult(None, None, "error: <|/tool_call|> without an opening "
                                      "<|tool_call|>", False))
      elif len(calls[r]) >= max_calls:
        inject(r, registry.CallResult(None, None, f"error: tool-call limit reached "
                                      f"({max_calls} per turn); answer without tools", False))
      else:
        waiting[r] = pool.submit(registry.run_call, text, tools, timeout_s=tool_timeout_s,
                                 max_result_chars=max_result_chars)
    else:
      feed[r] = [token]

  # Prefilled into a cache of exactly P slots, then grown: one compile per prompt width.
  token_B, logprob_B, cache = _prefill(params, prompt_BxP, lengths, forced(range(b)), rng,
                                       temperature, cfg=cfg, cache_len=p, **sample_args)
  cache = grow_cache(cache, slots)
  index = p  # the cache's next free slot (host copy of cache.index)
  steps = 0
  with concurrent.futures.ThreadPoolExecutor(max_workers, "tool") as pool:
    token_B, logprob_B = np.asarray(token_B), np.asarray(logprob_B)
    for r in range(b):
      take(r, int(token_B[r]), float(logprob_B[r]), pool)
    while True:
      for r in [r for r, f in waiting.items() if f.done()]:
        inject(r, waiting.pop(r).result())
      live = [r for r in range(b) if feed[r]]
      if not live:
        if not waiting:
          break
        concurrent.futures.wait(waiting.values(), return_when=concurrent.futures.FIRST_COMPLETED)
        continue
      width = _chunk_width(max(len(feed[r]) for r in live), max_width)
      if index + width > slots:
        slots = _round_up(max(index + width, 2 * slots), _SLOT_ROUND)
        cache = grow_cache(cache, slots)
      tokens_BxW = np.zeros((b, width), np.int32)
      positions_BxW = np.zeros((b, width), np.int32)
      segment_ids_BxW = np.zeros((b, width), np.int32)
      last_B = np.zeros(b, np.int32)
      for r in live:
        n = len(feed[r])
        tokens_BxW[r, :n] = feed[r]
        positions_BxW[r, :n] = pos[r] + np.arange(n)
        segment_ids_BxW[r, :n] = 1
        last_B[r] = n - 1
      forced_B = forced(live)
      steps += 1
      index += width
      token_B, logprob_B, cache = _step(params, cache, tokens_BxW, positions_BxW,
                                        segment_ids_BxW, last_B, forced_B, rng,
                                        np.int32(steps), temperature, cfg=cfg, **sample_args)
      token_B, logprob_B = np.asarray(token_B), np.asarray(logprob_B)
      for r in live:
        pos[r] += len(feed[r])
        feed[r] = []
        take(r, int(token_B[r]), float(logprob_B[r]), pool)
  return ToolGeneration(
      tokens=tokens, sampled=[np.asarray(s, bool) for s in sampled],
      logprobs=[np.asarray(lp, np.float32) for lp in logprobs], calls=calls, finish=finish,
      injected=injected, fed=pos.copy(), steps=steps, cache_slots=slots)
