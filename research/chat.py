"""The chat template: messages <-> token ids with a loss mask, and packing for SFT.

A message is `{"role": "system"|"user"|"assistant"|"tool", "content": str}`; an
assistant message may also carry `"tool_calls": [{"name": str, "arguments": dict}]`
(omitted, not `[]`, when there are none), and a `tool` message is a tool's result.
No other keys are allowed (`render` raises ValueError), so `parse(render(m)) == m`.

The template, built from the tokenizer's reserved chat ids (research/tokenizer.py):

  system     <|system|>content<|end_of_turn|>
  user       <|user|>content<|end_of_turn|>
  assistant  <|assistant|>content<|tool_call|>{json}<|/tool_call|>...<|end_of_turn|>
  tool       <|tool_result|>content<|/tool_result|>

- An assistant turn's tool calls follow its content, one `<|tool_call|>` ..
  `<|/tool_call|>` pair each, the JSON being
  `json.dumps({"name": ..., "arguments": ...}, sort_keys=True, ensure_ascii=False)`;
  the turn still ends with `<|end_of_turn|>`, so a sampler always stops on
  end_of_turn. The tool's answer is a `tool` message after that turn (no
  end_of_turn of its own: `<|/tool_result|>` closes it), then the next
  `<|assistant|>` turn reads it.
- Content and tool-call JSON are encoded with `Tokenizer.encode_text`: literal
  special-token text in content ("<|user|>", "<mask>") becomes byte pieces, never
  a reserved id, so content cannot forge structure.
- No bos and no eos: a conversation starts with its first header and ends with
  its last turn's closing token. Packed conversations are separate segments, so
  nothing marks the end of a conversation but its last end_of_turn.
- Loss mask: True on the assistant's content tokens, its tool-call tokens
  (`<|tool_call|>`, the JSON, `<|/tool_call|>`) and its `<|end_of_turn|>`;
  False on the `<|assistant|>` header and every system, user and tool token.
  The mask marks tokens to predict; the objective scores the prediction of
  token i+1 at position i (research/objectives.py: supervised).

Fitting and packing (`fit_to_context`, `pack_conversations`): a conversation
longer than the row is cut from the left at the start of a user turn, keeping
a leading system message when it still fits; one whose shortest kept suffix
does not fit or has no loss token is dropped. Each conversation is placed
whole in one row (first fit, in order: deterministic) as its own segment.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from research import data as data_lib
from research import tokenizer as tokenizer_lib

ROLES = ("system", "user", "assistant", "tool")
_IDS = tokenizer_lib.CHAT_IDS
_HEADER = {"system": _IDS["system"], "user": _IDS["user"], "assistant": _IDS["assistant"],
           "tool": _IDS["tool_result"]}
_ROLE_OF_HEADER = {v: k for k, v in _HEADER.items()}
EOT = _IDS["end_of_turn"]
TOOL_CALL, TOOL_CALL_END = _IDS["tool_call"], _IDS["tool_call_end"]
TOOL_RESULT_END = _IDS["tool_result_end"]


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One rendered conversation.

  ids: int32 [T]; loss_mask: bool [T]; turn_starts: int32 [num_messages], the
  index of each message's header token (plus, with a generation prompt, the
  index of the final `<|assistant|>`).
  """

  ids: np.ndarray
  loss_mask: np.ndarray
  turn_starts: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


def tool_call_json(call: Mapping[str, Any]) -> str:
  """The one JSON spelling of a tool call."""
  return json.dumps({"name": call["name"], "arguments": call["arguments"]},
                    sort_keys=True, ensure_ascii=False)


def check_message(i: int, m: Any) -> None:
  """Raises ValueError (naming message `i`) unless `m` is a well-formed message."""
  if not isinstance(m, Mapping):
    raise ValueError(f"message {i}: expected a dict, got {type(m).__name__}")
  role = m.get("role")
  if role not in ROLES:
    raise ValueError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
  if not isinstance(m.get("content"), str):
    raise ValueError(f"message {i}: content is {type(m.get('content')).__name__}, not a string")
  allowed = {"role", "content"} | ({"tool_calls"} if role == "assistant" else set())
  extra = set(m) - allowed
  if extra:
    raise ValueError(f"message {i} ({role}): unexpected keys {sorted(extra)}")
  calls = m.get("tool_calls")
  if "tool_calls" in m:
    if not isinstance(calls, list) or not calls:
      raise ValueError(f"message {i}: tool_calls must be a non-empty list (omit it if none)")
    for c in calls:
      if (not isinstance(c, Mapping) or set(c) != {"name", "arguments"}
          or not isinstance(c["name"], str) or not isinstance(c["arguments"], dict)):
        raise ValueError(f"message {i}: a tool call is {{'name': str, 'arguments': dict}}, "
                         f"got {c!r}")


def render(tokenizer: tokenizer_lib.Tokenizer, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = False) -> Rendered:
  """Token ids and loss mask of `messages` (see the module docstring).

  With `add_generation_prompt` the ids end with `<|assistant|>`, the prompt from
  which a sampler generates the next assistant turn (until `<|end_of_turn|>`).
  """
  ids: list[int] = []
  mask: list[bool] = []
  starts: list[int] = []
  for i, m in enumerate(messages):
    check_message(i, m)
    role = m["role"]
    starts.append(len(ids))
    ids.append(_HEADER[role])
    mask.append(False)
    body = tokenizer.encode_text(m["content"])
    if role == "assistant":
      for call in m.get("tool_calls", ()):
        body += [TOOL_CALL] + tokenizer.encode_text(tool_call_json(call)) + [TOOL_CALL_END]
    body.append(TOOL_RESULT_END if role == "tool" else EOT)
    ids += body
    mask += [role == "assistant"] * len(body)
  if add_generation_prompt:
    starts.append(len(ids))
    ids.append(_HEADER["assistant"])
    mask.append(False)
  return Rendered(np.asarray(ids, np.int32), np.asarray(mask, bool), np.asarray(starts, np.int32))


def _parse_call(text: str) -> dict[str, Any]:
  try:
    call = json.loads(text)
  except json.JSONDecodeError:
    call = None
  if (isinstance(call, dict) and set(call) == {"name", "arguments"}
      and isinstance(call["name"], str) and isinstance(call["arguments"], dict)):
    return call
  return {"name": None, "arguments": None, "raw": text}


def parse(tokenizer: tokenizer_lib.Tokenizer, ids: Sequence[int] | np.ndarray) -> list[dict]:
  """Messages of `ids`: the inverse of `render` (`parse(render(m).ids) == m`).

  Lenient, for model output: every header token starts a new message (closing an
  unfinished one); a turn cut off at the end (no end_of_turn, e.g. generation
  stopped at max tokens) is returned as it stands, so an `<|assistant|>` prompt
  followed by generated ids parses to a final assistant message; tokens before
  the first header and stray closing tokens are ignored; a tool call whose text
  is not `{"name": str, "arguments": dict}` JSON (or is never closed) becomes
  `{"name": None, "arguments": None, "raw": text}`.
  """
  messages: list[dict] = []
  role = None  # the open message's role
  content: list[int] = []
  calls: list[dict] = []
  call: list[int] | None = None  # ids of an open tool call

  def close():
    nonlocal role, content, calls, call
    if role is None:
      return
    if call is not None:
      calls.append(_parse_call(tokenizer.decode(call)))
    m = {"role": role, "content": tokenizer.decode(content)}
    if calls:
      m["tool_calls"] = calls
    messages.append(m)
    role, content, calls, call = None, [], [], None

  for t in np.asarray(ids).reshape(-1).tolist():
    if t in _ROLE_OF_HEADER:
      close()
      role = _ROLE_OF_HEADER[t]
    elif role is None:
      continue
    elif (t == EOT) if role != "tool" else (t == TOOL_RESULT_END):
      close()
    elif role == "assistant" and t == TOOL_CALL and call is None:
      call = []
    elif role == "assistant" and t == TOOL_CALL_END and call is not None:
      calls.append(_parse_call(tokenizer.decode(call)))
      call = None
    elif call is not None:
      call.append(t)
    else:
      content.append(t)
  close()
  return messages


def fit_to_context(rendered: Rendered, max_len: int, require_loss: bool = True
                   ) -> Rendered | None:
  """`rendered` if it fits in `max_len` tokens, else cut from the left, or None.

  A cut falls at the start of a user turn (so no turn, and no answer, is ever
  split, and the kept part opens with a question): whole turns are dropped from
  the oldest. A leading system message is kept if the shortest cut that fits with
  it exists, else the cut is made without it. With `require_loss` (training) the
  kept part must contain a loss token, else the conversation is dropped (None), as
  it is when even its last user turn onward does not fit. A chat prompt (rendered
  with the generation prompt) passes require_loss=False: None then means that its
  last user turn, with its header and the assistant header, does not fit.
  """
  n = len(rendered.ids)
  if n <= max_len:
    return rendered if rendered.loss_mask.any() or not require_loss else None
  starts = [int(s) for s in rendered.turn_starts]
  has_system = bool(starts) and rendered.ids[starts[0]] == _HEADER["system"]
  sys_len = starts[1] if has_system and len(starts) > 1 else 0
  cuts = [s for s in starts if rendered.ids[s] == _HEADER["user"] and s > 0]

  def piece(prefix_len, cut):
    keep = np.r_[np.arange(prefix_len), np.arange(cut, n)].astype(np.int64)
    new_starts = [s for s in starts if s < prefix_len] + [
        s - cut + prefix_len for s in starts if s >= cut]
    return Rendered(rendered.ids[keep], rendered.loss_mask[keep],
                    np.asarray(new_starts, np.int32))

  for prefix in ([sys_len, 0] if has_system else [0]):
    for cut in cuts:
      if cut >= prefix and prefix + n - cut <= max_len:
        if rendered.loss_mask[cut:].any() or not require_loss:
          return piece(prefix, cut)
        break  # later cuts keep a suffix of this one: no loss token either
  return None


def pack_conversations(rendered_list: Sequence[Rendered], seq_len: int
                       ) -> tuple[data_lib.PackedCorpus, dict[str, Any]]:
  """Packs conversations whole into rows of `seq_len`, each its own segment.

  Each conversation is first `fit_to_context(.., seq_len)` (truncated ones and
  dropped ones are counted), then placed in the first row with room for it,
  in input order (deterministic). Segment ids count 1, 2, ... per row and
  positions restart at 0 per conversation; padding is token 0, segment 0,
  position 0, loss_mask False. No eos is added (see the module docstring).

  Returns:
    (PackedCorpus with loss_mask, stats) with stats keys conversations (input
    count), truncated, dropped, packed, rows, tokens (real), loss_tokens, fill
    (real tokens / (rows * seq_len)).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  truncated = dropped = 0
  placed: list[list[Rendered]] = []
  free = np.zeros([16], np.int64)  # room left in each row
  for r in rendered_list:
    fitted = fit_to_context(r, seq_len)
    if fitted is None:
      dropped += 1
      continue
    truncated += len(fitted) < len(r)
    fits = free[:len(placed)] >= len(fitted)
    row = int(np.argmax(fits)) if fits.any() else len(placed)
    if row == len(placed):
      placed.append([])
      if row == len(free):
        free = np.concatenate([free, np.zeros_like(free)])
      free[row] = seq_len
    placed[row].append(fitted)
    free[row] -= len(fitted)
  shape = (len(placed), seq_len)
  tokens = np.full(shape, tokenizer_lib.PAD_ID, np.int32)
  segment_ids = np.zeros(shape, np.int32)
  positions = np.zeros(shape, np.int32)
  loss_mask = np.zeros(shape, bool)
  for row, convs in enumerate(placed):
    col = 0
    for seg, c in enumerate(convs, start=1):
      end = col + len(c)
      tokens[row, col:end] = c.ids
      segment_ids[row, col:end] = seg
      positions[row, col:end] = np.arange(len(c))
      loss_mask[row, col:end] = c.loss_mask
      col = end
  num_packed = sum(len(c) for c in placed)
  packed = data_lib.PackedCorpus(tokens, segment_ids, positions, num_packed, loss_mask)
  real = int(np.count_nonzero(segment_ids))
  stats = {
      "conversations": len(rendered_list),
      "truncated": int(truncated),
      "dropped": dropped,
      "packed": num_packed,
      "rows": len(placed),
      "tokens": real,
      "loss_tokens": int(loss_mask.sum()),
      "fill": real / max(tokens.size, 1),
  }
  return packed, stats
