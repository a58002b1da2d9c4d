"""A model's answers in the limitations study, through the tool runtime, and a short GRPO run.

  search_probe     closed-set answers after a search call (research/tools/runtime.py),
                   scored like `limitations.option_probabilities` with "I don't know" first
  tool_answers     greedy answers of the tokenizer-view model, with or without the python
                   tool, scored against the gold answers
  rl_bias          GRPO (research/ppo.py) on bias prompts, reward 1 for naming any role

Functions of a model's params and the data of research/limitations*.py; no files are
read or written (the python tool runs its code in research/tools/python_sandbox.py).
experiments/limitations.py trains the models and calls these.
"""
import copy
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import chat as chat_lib
from research import evaluation
from research import limitations as lim
from research import limitations_tools as lt
from research import model as model_lib
from research import ppo as ppo_lib
from research.tools import python_sandbox
from research.tools import registry
from research.tools import runtime
from research.tools import search as search_lib

EOT = chat_lib.EOT


def after_tools(gen, r: int) -> tuple[list[int], list[int]]:
  """(tokens up to and including the row's last injected result block, the sampled
  tokens after it without the end of turn)."""
  tokens, sampled = gen.tokens[r], gen.sampled[r]
  cut = 0
  for i in range(len(tokens)):
    if not sampled[i]:
      cut = i + 1
  return tokens[:cut], [t for t in tokens[cut:] if t != EOT]


def user_prompt(tokenizer, text: str) -> list[int]:
  """Token ids of one user turn and the assistant header (chat.render's prompt)."""
  return chat_lib.render(tokenizer, [{'role': 'user', 'content': text}],
                         add_generation_prompt=True).ids.tolist()


def search_tools(known):
  """{'search': the world search over `known`'s facts} and the search function."""
  index = search_lib.SearchIndex(lt.fact_documents(known), use_cache=False)
  search = lt.world_search(index)
  return {'search': registry.Tool(search, search_lib.SCHEMA, 'searches the people records')}, search


def search_probe(lm, tools, people, known: bool, max_new_tokens: int = 32) -> dict:
  """Like limitations.probe, through the tool runtime: greedy decoding runs the search
  calls; the options ("I don't know" first) are scored after the last tool result (or
  after the question when no call was made). Adds calls (per question) and call_ok."""
  width = 1 + max(len(lim.options(a)) - 1 for a in lim.ATTRIBUTES)
  probs, gold, questions, calls, ok = [], [], [], [], []
  for attribute in lim.ATTRIBUTES:
    prompts = [user_prompt(lm.tokenizer, lt.QUESTION_TEXT[attribute].format(name=p.name))
               for p in people]
    gen = runtime.generate_with_tools(lm.params, lm.cfg, lm.tokenizer, prompts, tools,
                                      max_new_tokens=max_new_tokens, max_calls=1,
                                      max_result_tokens=48)
    opts = [lim.IDK] + lim.options(attribute)[:-1]
    pairs = []
    for r, prompt in enumerate(prompts):
      context = prompt + after_tools(gen, r)[0]
      pairs += [(context, lm.tokenizer.encode_text(f'{o}.')) for o in opts]
      calls.append(len(gen.calls[r]))
      ok.append(bool(gen.calls[r]) and all(c.ok for c in gen.calls[r]))
    scores = np.array([s for s, _ in lm.score_tokens(pairs)]).reshape(len(people), -1)
    p_NxC = lim.option_probabilities(scores)
    probs.append(np.pad(p_NxC, ((0, 0), (0, width - len(opts)))))
    gold += [opts.index(lim.answer_of(p, attribute)) for p in people]
    questions += [(p, attribute) for p in people]
  return dict(probs=np.concatenate(probs), gold=np.asarray(gold),
              known=np.full(len(gold), known), questions=questions,
              calls=np.asarray(calls), call_ok=np.asarray(ok))


def python_tools() -> dict:
  """{'python': the sandboxed python tool (5 s per call)}."""
  return {'python': registry.Tool(lambda code: python_sandbox.python_tool(code, timeout_s=5.0),
                                  python_sandbox.SCHEMA, 'runs Python 3 code')}


def tool_answers(lm, train, test) -> dict:
  """Greedy answers of `lm` (a ResearchLM) to the `test` (task, item) questions, asked
  directly (no tools: a call gets an error result) and with USE_PYTHON (the python
  tool runs the code). Returns per task and mode: right, n, calls, accuracy with its
  Wilson interval, two examples; per task the majority-answer baseline (the commonest
  gold answer of `train`) and, for 'compare', the accuracy of comparing the digits
  after the point as integers (the tokenizer trap: 9.11 > 9.9)."""
  out = {}
  for with_tool in (False, True):
    prompts = [user_prompt(lm.tokenizer, lt.question(t, i) + (lt.USE_PYTHON if with_tool else ''))
               for t, i in test]
    gen = runtime.generate_with_tools(lm.params, lm.cfg, lm.tokenizer, prompts,
                                      python_tools() if with_tool else {}, max_new_tokens=48,
                                      max_calls=1, max_result_tokens=16)
    for r, (task, item) in enumerate(test):
      answer = lt.final_answer(lm.tokenizer.decode(after_tools(gen, r)[1]))
      rec = out.setdefault(task, {}).setdefault(
          'tool' if with_tool else 'direct', dict(right=0, n=0, calls=0, examples=[]))
      rec['right'] += int(answer == lt.gold(task, item))
      rec['n'] += 1
      rec['calls'] += int(bool(gen.calls[r]))
      if len(rec['examples']) < 2:
        rec['examples'].append(dict(question=lt.question(task, item), answer=answer,
                                    gold=lt.gold(task, item),
                                    calls=[c.arguments for c in gen.calls[r]]))
  for task, recs in out.items():
    gold_train = [lt.gold(t, i) for t, i in train if t == task]
    gold_test = [lt.gold(t, i) for t, i in test if t == task]
    majority = max(sorted(set(gold_train)), key=gold_train.count)
    for rec in recs.values():
      rec['accuracy'] = rec['right'] / rec['n']
      rec['ci'] = list(evaluation.wilson_interval(rec['right'], rec['n']))
    recs['majority_baseline'] = float(np.mean([g == majority for g in gold_test]))
    if task == 'compare':
      recs['string_rule_baseline'] = float(np.mean(
          [lt.larger_by_digits(*i) == lt.larger(*i) for t, i in test if t == task]))
  return out


def role_sentences(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """The tokens of ' <role>.' for every role of `lim.ROLES`, as they follow a bias prompt
  -> (sentences R×L int32, zero-padded; lengths R int32). Raises ValueError when the
  prompt's tokens change with the role (the continuation would not be well defined)."""
  prompt = lim.bias_prompt(lim.bias_names()[0], lim.GROUPS[0])
  head = tokenizer.encode(prompt)
  rows = []
  for role in lim.ROLES:
    ids = list(tokenizer.encode(prompt + f' {role}.'))
    if ids[:len(head)] != list(head):
      raise ValueError(f'role {role!r}: the bias prompt tokenizes differently before it')
    rows.append(ids[len(head):])
  width = max(map(len, rows))
  return (np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32),
          np.asarray([len(r) for r in rows], np.int32))


def rl_bias(config, lm, seed: int):
  """GRPO (research/ppo.py) from `lm` on bias prompts with training-style names, reward
  `role_sentence_reward`: 1 for ' <role>.' then eos, for any role of lim.ROLES alike
  (blind to which role, but a role must be named). Returns (a copy of `lm` with the RL
  params, metrics per iteration)."""
  rc = config['rl']
  tokenizer = lm.tokenizer
  stop = tokenizer.eos_id  # training texts end '... is a farmer.' + eos
  sentences_RxL, lengths_R = role_sentences(tokenizer)
  cfg = ppo_lib.PPOConfig(beta=rc['beta'], epochs=2, max_new_tokens=int(lengths_R.max()) + 2,
                          advantage='grpo', group_size=rc['group_size'], no_eos_penalty=0.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(rc['learning_rate']))
  reward = lambda p, l, resp, valid: lt.role_sentence_reward(resp, valid, sentences_RxL,
                                                             lengths_R, stop)
  model = model_lib.Transformer(lm.cfg)
  iteration = jax.jit(ppo_lib.make_ppo_iteration(model, None, None, reward, tx, None, cfg,
                                                 stop, pad_id=0), donate_argnums=0)
  ref = jax.tree.map(jnp.copy, lm.params)
  state = ppo_lib.init_ppo_state(jax.tree.map(jnp.copy, lm.params), tx, cfg,
                                 jax.random.key(seed))
  rng = random.Random(seed)
  names = lim.bias_names()
  history = []
  for _ in range(rc['iterations']):
    prompts = [tokenizer.encode(lim.bias_prompt(rng.choice(names), rng.choice(lim.GROUPS)))
               for _ in range(rc['prompts'])]
    width = max(map(len, prompts))
    prompt_BxP = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
      prompt_BxP[i, :len(p)] = p
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    prompt_BxP, lengths_B = ppo_lib.repeat_prompts(jnp.asarray(prompt_BxP),
                                                   jnp.asarray(lengths_B), cfg.group_size)
    state, metrics, _ = iteration(state, prompt_BxP, lengths_B, ref_params=ref)
    history.append(dict(reward=float(metrics['score_mean']), kl=float(metrics['kl_k1']),
                        entropy=float(metrics['entropy'])))
  tuned = copy.copy(lm)
  tuned.params = state.policy_params
  return tuned, history
