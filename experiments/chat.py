"""Chat with a fine-tuned model in the terminal, or answer one prompt for a script.

  python -m experiments.chat --workdir=runs/sft                 # interactive
  python -m experiments.chat --workdir=runs/sft --prompt="Hi!"  # one reply, then exit
      [--system="..."] [--temperature=0.7] [--top_k=0] [--top_p=0.95] [--max_new_tokens=128]
      [--tools]  # the model may call calculator, search and python (research/tools)

Interactive commands: /reset (forget the conversation), /quit (or Ctrl-D). Tokens are
printed as they are decoded (KV-cache prefill of the conversation, then one cached
decode step per token). The conversation is kept across turns. Length rule: the prompt
(conversation + assistant header) gets max_len - --max_new_tokens tokens; when it does
not fit, whole turns (a user message and the replies after it) are dropped from the
oldest (`research.chat.fit_to_context`); the system message is kept if it fits with
the current message, else dropped; a current message that cannot fit with its headers
even alone is an error message (one line; the message is not added to the history,
--prompt exits with status 2), never a silent truncation. Text that is not valid
Unicode (e.g. undecodable bytes typed or passed as a flag) is refused the same way.

With --tools a reply is decoded by `research.tools.runtime.generate_with_tools`: when
the model closes a `<|tool_call|>`, the tool runs and its result is pasted into the
context; each call and result is printed as a line, then the final answer (not
streamed token by token).
"""
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common
from research import chat
from research import checkpoint as checkpoint_lib
from research import model as model_lib
from research import sampling
from research import tokenizer as tokenizer_lib
from research.tools import registry as tool_registry
from research.tools import runtime as tool_runtime

UserError = common.UserError  # one line, exit 2 (common.run_main)


@functools.partial(jax.jit, static_argnames=('cfg', 'cache_len'))
def _prefill(params, prompt_1xP, length_1, cfg, cache_len):
  return sampling.prefill(params, prompt_1xP, length_1, cfg=cfg, cache_len=cache_len)


@functools.partial(jax.jit, static_argnames=('cfg', 'top_k', 'top_p'))
def _next(params, logits_1xV, position, cache, rng, temperature, cfg, top_k, top_p):
  """Samples a token from the previous logits and feeds it: -> (token, logits, cache)."""
  token_1, _ = sampling.sample_logits(rng, logits_1xV, temperature, top_k, top_p)
  logits_1xV, cache = sampling.decode_step(params, token_1, position[None], cache, cfg=cfg)
  return token_1[0], logits_1xV, cache


@dataclasses.dataclass
class ChatSession:
  """A conversation with one model; `reply` streams the assistant's answer."""
  params: object
  cfg: model_lib.TransformerConfig
  tokenizer: object
  system: str = ''
  temperature: float = 0.7
  top_k: int = 0
  top_p: float = 0.95
  max_new_tokens: int = 128
  seed: int = 0
  tools: dict | None = None  # name -> research.tools.registry.Tool; None: no tool use
  messages: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.params, self.cfg = sampling.unrolled(self.params, self.cfg)
    self.turns = 0
    self.reset()

  def reset(self):
    self.messages = [{'role': 'system', 'content': self.system}] if self.system else []

  def _prompt_ids(self) -> list[int]:
    """The conversation plus the assistant header, whole oldest turns dropped to leave
    room (the module docstring's length rule). Raises UserError when the last user
    message does not fit even alone."""
    budget = self.cfg.max_len - self.max_new_tokens
    rendered = chat.render(self.tokenizer, self.messages, add_generation_prompt=True)
    fitted = chat.fit_to_context(rendered, budget, require_loss=False)
    if fitted is None:
      alone = chat.render(self.tokenizer, self.messages[-1:], add_generation_prompt=True)
      raise UserError(f'message too long: {len(alone.ids)} tokens with its headers, the '
                      f'model\'s {self.cfg.max_len}-token context leaves {budget} after '
                      f'--max_new_tokens={self.max_new_tokens}; shorten it')
    return list(fitted.ids)

  def reply(self, text: str, on_text=lambda s: None) -> str:
    """Adds the user turn, samples the answer (calling on_text with each new piece of
    text as it is decoded), adds it to the history and returns it. Raises UserError
    (the turn not added) for text that is not valid Unicode or cannot fit."""
    problem = tokenizer_lib.text_problem(text)
    if problem:
      raise UserError(f'message: {problem}')
    self.messages.append({'role': 'user', 'content': text})
    try:
      ids = self._prompt_ids()
    except UserError:
      self.messages.pop()
      raise
    if self.tools is not None:
      return self._reply_with_tools(ids, on_text)
    eot = self.tokenizer.chat_ids['end_of_turn']
    # Prompts padded to a multiple of 64 columns: a few compiled shapes, not one per turn.
    width = -(-len(ids) // 64) * 64
    prompt = np.zeros((1, width), np.int32)
    prompt[0, :len(ids)] = ids
    logits, cache = _prefill(self.params, prompt, np.array([len(ids)], np.int32), self.cfg,
                             width + self.max_new_tokens)
    rng = jax.random.fold_in(jax.random.key(self.seed), self.turns)
    self.turns += 1
    out, shown = [], ''
    for t in range(self.max_new_tokens):
      token, logits, cache = _next(self.params, logits, jnp.int32(len(ids) + t), cache,
                                   jax.random.fold_in(rng, t), self.temperature, self.cfg,
                                   self.top_k, self.top_p)
      token = int(token)
      if token == eot:
        break
      out.append(token)
      text_so_far = self.tokenizer.decode(out)
      if not text_so_far.endswith('\ufffd'):  # wait for a whole UTF-8 character
        on_text(text_so_far[len(shown):])
        shown = text_so_far
    answer = self.tokenizer.decode(out)
    if answer != shown:
      on_text(answer[len(shown):])
    self.messages.append({'role': 'assistant', 'content': answer})
    return answer

  def _reply_with_tools(self, ids, on_text) -> str:
    """The turn decoded with tool calls; its messages (calls, results, answer) are added
    to the history, each call shown as "[name args -> result]"; returns the answer."""
    out = tool_runtime.generate_with_tools(
        self.params, self.cfg, self.tokenizer, [ids], self.tools,
        max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
        top_p=self.top_p, seed=self.seed + self.turns)
    self.turns += 1
    messages = chat.parse(self.tokenizer,
                          [self.tokenizer.chat_ids['assistant']] + out.tokens[0])
    for m in messages:
      for call in m.get('tool_calls', ()):
        on_text(f'[{call["name"]} {json.dumps(call["arguments"])} -> ')
      if m['role'] == 'tool':
        on_text(f'{m["content"]}]\n')
    answer = messages[-1]['content'] if messages and messages[-1]['role'] == 'assistant' else ''
    on_text(answer)
    self.messages += messages
    return answer


def load_session(workdir, **kwargs) -> ChatSession:
  params, config, tokenizer = checkpoint_lib.load_stage(workdir)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  if cfg.scalar_head:
    raise UserError(f'{workdir} holds a reward/value model, not a policy')
  return ChatSession(params, cfg, tokenizer, **kwargs)


def interactive(session: ChatSession, read=input, write=sys.stdout.write):
  write('chat: /reset clears the conversation, /quit (or Ctrl-D) exits\n')
  while True:
    try:
      text = read('you> ')
    except EOFError:
      write('\n')
      return
    except UnicodeDecodeError as e:  # undecodable bytes typed in a UTF-8 terminal
      write(f'error: message: not UTF-8 at byte {e.start}\n')
      continue
    if text.strip() == '/quit':
      return
    if text.strip() == '/reset':
      session.reset()
      write('(conversation cleared)\n')
      continue
    if not text.strip():
      continue
    write('assistant> ')
    try:
      session.reply(text, on_text=lambda s: (write(s), sys.stdout.flush()))
    except UserError as e:
      write(f'\nerror: {e}')
    write('\n')


def define_flags():
  """Flags are defined only when this module runs as a program, so other modules can
  import ChatSession without flag clashes."""
  define = dict(
      workdir=lambda: flags.DEFINE_string('workdir', None, 'A fine-tuned (SFT / PPO) run folder.'),
      prompt=lambda: flags.DEFINE_string('prompt', None,
                                         'One user message: print the reply and exit.'),
      system=lambda: flags.DEFINE_string('system', '', 'An optional system message.'),
      max_new_tokens=lambda: flags.DEFINE_integer('max_new_tokens', 128, 'Most tokens per reply.'),
      temperature=lambda: flags.DEFINE_float('temperature', 0.7,
                                             'Sampling temperature; 0 is greedy.'),
      top_k=lambda: flags.DEFINE_integer('top_k', 0,
                                         'Sample among the k most likely tokens (0: all).'),
      top_p=lambda: flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass (1: off).'),
      seed=lambda: flags.DEFINE_integer('seed', 0, 'Sampling seed.'),
      tools=lambda: flags.DEFINE_bool('tools', False, 'Let the model call calculator, '
                                      'search (State of the Union speeches) and python.'))
  return {name: fn() for name, fn in define.items()}


def main(argv, chat_flags):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  f = {name: flag.value for name, flag in chat_flags.items()}
  try:
    if not f['workdir']:
      raise UserError('--workdir is required (a fine-tuned run folder, e.g. runs/sft)')
    if (f['max_new_tokens'] < 1 or f['temperature'] < 0 or f['top_k'] < 0
        or not 0 < f['top_p'] <= 1):
      raise UserError('need --max_new_tokens >= 1, --temperature >= 0, --top_k >= 0, '
                      '0 < --top_p <= 1')
    for name in ('prompt', 'system'):
      problem = tokenizer_lib.text_problem(f[name] or '')
      if problem:
        raise UserError(f'--{name}: {problem}')
    session = load_session(f['workdir'], system=f['system'], temperature=f['temperature'],
                           top_k=f['top_k'], top_p=f['top_p'],
                           max_new_tokens=f['max_new_tokens'], seed=f['seed'],
                           tools=tool_registry.default_tools() if f['tools'] else None)
    if session.cfg.max_len <= f['max_new_tokens']:
      raise UserError(f'--max_new_tokens={f["max_new_tokens"]} leaves no room in the '
                      f'model\'s {session.cfg.max_len}-token context')
    stream = lambda s: (sys.stdout.write(s), sys.stdout.flush())
    if f['prompt'] is not None:
      session.reply(f['prompt'], on_text=stream)
      sys.stdout.write('\n')
  except (UserError, checkpoint_lib.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if f['prompt'] is None:
    interactive(session)


if __name__ == '__main__':
  chat_flags = define_flags()
  common.run_main(lambda argv: main(argv, chat_flags))  # (a bad flag: one line, exit 2)
