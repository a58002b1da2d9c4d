"""Any stage's workdir as an lm-evaluation-harness model (`lm_eval` 0.4.13).

    from research import lm_eval_model          # registers the model name 'research'
    lm_eval.simple_evaluate(model='research', model_args='workdir=runs/sft', tasks=[...])

The class reads a finished workdir with `checkpoint.load_stage` (pretraining, SFT, DPO,
PPO: anything whose checkpoint holds Transformer params) and answers the harness's
three request types:

  loglikelihood          log p(continuation | context), summed over the continuation's
                         tokens, and whether greedy decoding would produce it;
  loglikelihood_rolling  log p(text) of a whole text, in windows of the model's context
                         (lm_eval's rolling windows; every token predicted once);
  generate_until         KV-cached decoding (`sampling.complete`), cut at the first of
                         the request's `until` strings.

Scoring is one jitted forward pass per batch (`token_log_probs`); rows are sorted by
length, padded to a multiple of 32 columns and to `batch_size` rows, so a whole task
compiles a handful of times. Padding goes after (`padding_side='right'`, default) or
before each row; positions count each row's real tokens from 0 and pads are segment
0 (never attended), so a row scores the same whatever its batch or padding.

Chat stages. A workdir whose config has an `init` (SFT, DPO, PPO) is a chat model:
`apply_chat_template` (the harness's `--apply_chat_template`) renders messages with
our template (research/chat.py), and generation also stops at `<|end_of_turn|>`.
`tok_encode` reads the chat template's special-token text ("<|user|>", ...) as the
reserved ids and encodes the text between them separately, so
`tok_encode(apply_chat_template(m))` equals `chat.render(m, add_generation_prompt=True)`.
Override with model arg `chat=true|false`.

Lengths. Rows never exceed the model's `max_len` (its training length): a context is
cut from the left, a continuation longer than max_len - 1 keeps its first max_len - 1
tokens (as `evaluation.choice_rows`); a prompt keeps its last max_len - max_gen_toks
tokens. An empty context is conditioned on eos (the harness's convention).
"""
from __future__ import annotations

import collections
import functools
import json
import pathlib
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from research import chat as chat_lib
from research import checkpoint as checkpoint_lib
from research import model as model_lib
from research import sampling
from research import tokenizer as tokenizer_lib

MODEL_NAME = 'research'
PADDING_SIDES = ('right', 'left')
_CHAT_PIECES = {piece: i for piece, i in tokenizer_lib.SPECIAL_TOKENS.items()
                if i in set(tokenizer_lib.CHAT_IDS.values())}
_CHAT_RE = re.compile('|'.join(re.escape(p) for p in _CHAT_PIECES))
_PIECE_OF = {i: p for p, i in _CHAT_PIECES.items()}


@functools.partial(jax.jit, static_argnames=('cfg',))
def token_log_probs(params, tokens_BxL, segment_ids_BxL, *, cfg):
  """Causal log-probabilities of every token given the tokens before it in its row.

  Args:
    params, cfg: the model (cfg static).
    tokens_BxL: int32 tokens; pads anywhere (before or after) carry segment id 0.
    segment_ids_BxL: int32, 1 on real tokens, 0 on pads (one text per row).

  Returns:
    (log p(token i | tokens < i) float32 B×L, greedy bool B×L: token i is the argmax
    at position i-1). Column 0 and the first real token of a row have no prediction:
    their values are meaningless (never scored).
  """
  real_BxL = segment_ids_BxL > 0
  positions_BxL = jnp.maximum(jnp.cumsum(real_BxL, axis=1) - 1, 0)
  hidden_BxLxD, _ = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxL, positions_BxL, segment_ids_BxL,
      jnp.zeros(tokens_BxL.shape, bool))
  log_p_BxLxV = jax.nn.log_softmax(model_lib.logits(params, hidden_BxLxD, cfg.compute_dtype))
  targets_BxL1 = tokens_BxL[:, 1:]
  lp_BxL1 = jnp.take_along_axis(log_p_BxLxV[:, :-1], targets_BxL1[..., None], axis=2)[..., 0]
  greedy_BxL1 = jnp.argmax(log_p_BxLxV[:, :-1], axis=-1) == targets_BxL1
  b = tokens_BxL.shape[0]
  return (jnp.concatenate([jnp.zeros((b, 1), jnp.float32), lp_BxL1], axis=1),
          jnp.concatenate([jnp.ones((b, 1), bool), greedy_BxL1], axis=1))


def is_chat_stage(config: dict) -> bool:
  """True for a stage fine-tuned from another (SFT, DPO, PPO: config has `init`)."""
  return bool(config.get('init'))


def _as_bool(value, key: str) -> Optional[bool]:
  if value is None or value == 'auto':
    return None
  if isinstance(value, bool):
    return value
  text = str(value).lower()
  if text in ('true', '1', 'yes'):
    return True
  if text in ('false', '0', 'no'):
    return False
  raise ValueError(f'model arg {key}={value!r}: expected true, false or auto')


def _as_int(value, key: str, default: int) -> int:
  if value is None or value == 'auto' or value == '':
    return default
  try:
    out = int(value)
  except (TypeError, ValueError):
    raise ValueError(f'model arg {key}={value!r}: expected an integer') from None
  if out < 1:
    raise ValueError(f'model arg {key}={value!r}: must be >= 1')
  return out


@register_model(MODEL_NAME)
class ResearchLM(TemplateLM):
  """lm_eval model backed by a workdir; model args (strings from the CLI are parsed):

    workdir        a finished run (required)
    batch_size     rows per forward pass / decode batch (default 16; 'auto' = 16)
    padding_side   'right' (default) or 'left'
    max_gen_toks   default new-token budget of generate_until (default 64)
    chat           true | false | auto (default: chat for stages with an `init`)
    seed           sampling seed when a request asks for do_sample (default 0)

  Raises checkpoint.CheckpointError for a workdir that is not a finished run or is a
  reward model (scalar head), ValueError for a malformed arg.
  """

  def __init__(self, workdir=None, batch_size=16, padding_side='right', max_gen_toks=64,
               chat='auto', seed=0, max_batch_size=None, device=None, **unused):
    super().__init__()
    del max_batch_size, device, unused  # the harness passes these to every model
    if not workdir:
      raise ValueError('model arg workdir is required (model_args="workdir=runs/x")')
    if padding_side not in PADDING_SIDES:
      raise ValueError(f'model arg padding_side={padding_side!r}: expected one of '
                       f'{PADDING_SIDES}')
    self.workdir = pathlib.Path(workdir)
    params, config, tokenizer = checkpoint_lib.load_stage(self.workdir)
    self.cfg = model_lib.TransformerConfig.from_dict(config['model'])
    if self.cfg.scalar_head:
      raise checkpoint_lib.CheckpointError(
          f'{self.workdir}: a reward model (scalar head), not a language model')
    self.params, self.config, self.tokenizer = params, config, tokenizer
    self.batch_size = _as_int(batch_size, 'batch_size', 16)
    self.padding_side = padding_side
    self.max_gen_toks = _as_int(max_gen_toks, 'max_gen_toks', 64)
    self.seed = int(seed)
    chat_flag = _as_bool(chat, 'chat')
    self.chat = is_chat_stage(config) if chat_flag is None else chat_flag

  # -- what the harness asks of a model ------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self.cfg.max_len

  @property
  def tokenizer_name(self) -> str:
    return f'research-{self.tokenizer.fingerprint}'

  def chat_template(self, chat_template=False) -> str:
    del chat_template
    return 'research.chat: <|role|>content<|end_of_turn|> ... <|assistant|>'

  def get_model_info(self) -> dict:
    return dict(workdir=str(self.workdir), chat=self.chat, max_length=self.max_length,
                tokenizer_fingerprint=self.tokenizer.fingerprint)

  def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
    """Messages -> the text of our chat template (special tokens spelled as text).

    Raises ValueError for a malformed message (unknown role, extra keys).
    """
    parts = []
    for i, m in enumerate(chat_history):
      m = {'role': m['role'], 'content': m['content']}
      chat_lib.check_message(i, m)
      header = tokenizer_lib.CHAT_IDS['tool_result' if m['role'] == 'tool' else m['role']]
      close = chat_lib.TOOL_RESULT_END if m['role'] == 'tool' else chat_lib.EOT
      parts += [_PIECE_OF[header], m['content'], _PIECE_OF[close]]
    if add_generation_prompt:
      parts.append(_PIECE_OF[tokenizer_lib.CHAT_IDS['assistant']])
    return ''.join(parts)

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    """Token ids of `string`: chat special-token text -> its id, the text between
    encoded piece by piece (as chat.render encodes message contents); no bos/eos."""
    del add_special_tokens, kwargs
    ids, start = [], 0
    for m in _CHAT_RE.finditer(string):
      if m.start() > start:
        ids += self.tokenizer.encode_text(string[start:m.start()])
      ids.append(_CHAT_PIECES[m.group()])
      start = m.end()
    if start < len(string):
      ids += self.tokenizer.encode_text(string[start:])
    return ids

  def tok_decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  # -- scoring ---------------------------------------------------------------------------

  def score_tokens(self, pairs) -> list[tuple[float, bool]]:
    """(sum of log p over the continuation (nats), every token greedy) per
    (context ids, continuation ids) pair; context non-empty. See the module doc for
    truncation."""
    rows = []
    for context, continuation in pairs:
      continuation = [int(t) for t in continuation][:self.max_length - 1]
      context = [int(t) for t in context]
      context = context[max(0, len(context) - (self.max_length - len(continuation))):]
      if not context:
        raise ValueError('a loglikelihood request needs at least one context token')
      rows.append((context + continuation, len(continuation)))
    out: list[Any] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for s in range(0, len(order), self.batch_size):
      chunk = order[s:s + self.batch_size]
      width = min(-(-len(rows[chunk[0]][0]) // 32) * 32, self.max_length)
      tokens = np.zeros((self.batch_size, width), np.int32)
      segs = np.zeros((self.batch_size, width), np.int32)
      offsets = []
      for r, i in enumerate(chunk):
        ids = rows[i][0]
        off = width - len(ids) if self.padding_side == 'left' else 0
        tokens[r, off:off + len(ids)] = ids
        segs[r, off:off + len(ids)] = 1
        offsets.append(off)
      lp, greedy = token_log_probs(self.params, tokens, segs, cfg=self.cfg)
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for r, i in enumerate(chunk):
        ids, n = rows[i]
        end = offsets[r] + len(ids)
        out[i] = (float(lp[r, end - n:end].sum()), bool(greedy[r, end - n:end].all()))
    return out

  def loglikelihood_texts(self, pairs) -> list[tuple[float, bool]]:
    """`loglikelihood` without Instances: (context, continuation) text pairs ->
    (log p(continuation | context) in nats, greedy) each; the harness's tokenisation."""
    pairs = [(c, x) for c, x in pairs]
    encoded = []
    for context, continuation in pairs:
      if context:
        encoded.append(self._encode_pair(context, continuation))
      else:
        encoded.append(([self.prefix_token_id], self.tok_encode(continuation)))
    return self.score_tokens(encoded)

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    del disable_tqdm, kwargs
    results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), res in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, res)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm=False) -> list[float]:
    """log p(text) (nats) of each request's whole text, conditioned on eos."""
    del disable_tqdm
    windows, owner = [], []
    for r, (string,) in enumerate(req.args for req in requests):
      for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length - 1, context_len=1)):
        windows.append(w)
        owner.append(r)
    scores = self.score_tokens(windows)
    totals = np.zeros(len(requests))
    for r, (lp, _) in zip(owner, scores):
      totals[r] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', (req.args[0],), float(total))
    return [float(t) for t in totals]

  # -- generation ------------------------------------------------------------------------

  def generate_texts(self, contexts, until=(), max_gen_toks: Optional[int] = None,
                     temperature: float = 0.0) -> list[str]:
    """KV-cached continuations of text prompts, each cut before the first `until`
    string (and at eos, or <|end_of_turn|> for a chat model). temperature 0: greedy."""
    n = min(max_gen_toks or self.max_gen_toks, self.max_length - 1)
    keep = self.max_length - n
    prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for c in contexts]
    stop = tokenizer_lib.CHAT_IDS['end_of_turn'] if self.chat else self.tokenizer.eos_id
    outs = sampling.complete(self.params, self.cfg, prompts, max_new_tokens=n, eos_id=stop,
                             batch_size=self.batch_size, temperature=temperature,
                             seed=self.seed)
    texts = []
    for ids in outs:
      ids = [t for t in ids if t not in (stop, self.tokenizer.eos_id)]
      text = self.tokenizer.decode(ids)
      for u in until:
        if u:
          text = text.split(u, 1)[0]
      texts.append(text)
    return texts

  def generate_until(self, requests, disable_tqdm=False) -> list[str]:
    del disable_tqdm
    groups = collections.defaultdict(list)
    for i, req in enumerate(requests):
      groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
    out: list[Any] = [None] * len(requests)
    for key, idx in groups.items():
      kw = dict(requests[idx[0]].args[1])
      until = kw.pop('until', None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen = kw.pop('max_gen_toks', None) or kw.pop('max_new_tokens', None)
      temperature = float(kw.pop('temperature', 0.0) or 0.0) if kw.pop('do_sample', False) \
          else 0.0
      texts = self.generate_texts([requests[i].args[0] for i in idx], until,
                                  int(max_gen) if max_gen else None, temperature)
      for i, text in zip(idx, texts):
        out[i] = text
        self.cache_hook.add_partial('generate_until', (requests[i].args[0], json.loads(key)),
                                    text)
    return out
