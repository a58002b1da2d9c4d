"""The tool-using parts of experiments/limitations.py and bias through SFT and RL.

  search     hallucination mitigation 2: the world model fine-tuned on conversations that
             call the search tool (BM25 over the known people's facts) and answer from
             its result, or say "I don't know" when it finds nothing; asked about known
             and unknown-test people through `research/tools/runtime.py`, the answer
             scored like mitigation 1 (options by log-likelihood after the tool result)
  rl         a short GRPO run (research/ppo.py) from the SFT model on the bias prompts,
             rewarded for ending the text (eos) within 4 tokens, whichever role it names
  tokenizer  letter counting and "which is larger, 9.11 or 9.9" on a model trained on
             both tasks, asked directly and with the python tool (research/tools
             python sandbox); token splits shown
Data and metrics: research/limitations_tools.py, research/limitations.py.
"""
import copy
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
from research import chat as chat_lib
from research import data as data_lib
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


def _after_tools(gen, r: int) -> tuple[list[int], list[int]]:
  """(tokens up to and including the row's last injected result block, the sampled
  tokens after it without the end of turn)."""
  tokens, sampled = gen.tokens[r], gen.sampled[r]
  cut = 0
  for i in range(len(tokens)):
    if not sampled[i]:
      cut = i + 1
  return tokens[:cut], [t for t in tokens[cut:] if t != EOT]


def _prompt(tokenizer, text: str) -> list[int]:
  return chat_lib.render(tokenizer, [{'role': 'user', 'content': text}],
                         add_generation_prompt=True).ids.tolist()


# -- hallucination mitigation 2: search ----------------------------------------------------


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
    prompts = [_prompt(lm.tokenizer, lt.QUESTION_TEXT[attribute].format(name=p.name))
               for p in people]
    gen = runtime.generate_with_tools(lm.params, lm.cfg, lm.tokenizer, prompts, tools,
                                      max_new_tokens=max_new_tokens, max_calls=1,
                                      max_result_tokens=48)
    opts = [lim.IDK] + lim.options(attribute)[:-1]
    pairs = []
    for r, prompt in enumerate(prompts):
      context = prompt + _after_tools(gen, r)[0]
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


def search_mitigation(config, root, tokenizer, base_texts, split, lm, train_arm, merge, scored):
  """Fine-tunes the world model `lm` on search conversations (known and unknown-probe
  people) mixed with its pretraining texts; measures it on known and unknown-test people.
  Returns (results, the tuned ResearchLM)."""
  hc = config['hallucination']
  known, unknown_probe, unknown_test = split
  tools, search = search_tools(known)
  convs = [lt.search_conversation(p, a, search(p.name))
           for p in known + unknown_probe for a in lim.ATTRIBUTES]
  ids = [chat_lib.render(tokenizer, c).ids.tolist() for c in convs]
  tuned = train_arm(root / 'world_search', base_texts + ids * hc['repeats'], tokenizer, config,
                    hc['finetune_steps'], init_params=jax.tree.map(jnp.copy, lm.params))
  known_pr, unknown_pr = (search_probe(tuned, tools, known, True),
                          search_probe(tuned, tools, unknown_test, False))
  out = scored(merge(known_pr, unknown_pr), hc)
  out.update(known_call_rate=float(np.mean(known_pr['calls'] > 0)),
             unknown_call_rate=float(np.mean(unknown_pr['calls'] > 0)),
             call_ok_rate=float(np.mean(np.concatenate([known_pr['call_ok'],
                                                        unknown_pr['call_ok']]))),
             conversations=len(convs),
             examples=[tokenizer.decode(chat_lib.render(tokenizer, c).ids.tolist())
                       for c in (convs[0], convs[-1])])
  return out, tuned


# -- bias after RL ---------------------------------------------------------------------------


def rl_bias(config, lm, seed: int):
  """GRPO (research/ppo.py) from `lm` on bias prompts with training-style names, reward
  `closed_sentence_reward` (1 for ' <role>.' then eos within 4 tokens, blind to the
  role). Returns (a copy of `lm` with the RL params, metrics per iteration)."""
  rc = config['rl']
  tokenizer = lm.tokenizer
  stop = tokenizer.eos_id  # training texts end '... is a farmer.' + eos
  cfg = ppo_lib.PPOConfig(beta=rc['beta'], epochs=2, max_new_tokens=6, advantage='grpo',
                          group_size=rc['group_size'], no_eos_penalty=0.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(rc['learning_rate']))
  reward = lambda p, l, resp, valid: lt.closed_sentence_reward(resp, valid, stop)
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


# -- tokenizer view ----------------------------------------------------------------------------


def tokenizer_items(config, seed: int):
  """(train items, test items): per task a list of (task, item); test words and pairs
  never appear in training."""
  tc = config['tokenizer_view']
  words = lt.vocabulary_words([d.text for d in data_lib.sotu_documents()],
                              tc['train_words'] + tc['test_words'])
  test_words = words[::len(words) // tc['test_words']][:tc['test_words']]
  train_words = [w for w in words if w not in set(test_words)]
  test = [('count', i) for i in lt.letter_items(test_words, 2, seed + 1)]
  train = [('count', i) for i in lt.letter_items(train_words, tc['per_word'], seed)]
  pairs_test = lt.decimal_pairs(tc['test_pairs'], seed + 2)
  held = frozenset(pairs_test) | frozenset((b, a) for a, b in pairs_test)
  train += [('compare', i) for i in lt.decimal_pairs(tc['train_pairs'], seed + 3, held)]
  test += [('compare', i) for i in pairs_test]
  return train, test


def tokenizer_texts(items) -> list:
  """Both conversations (direct, with the python tool) of each item, as rendered text
  for tokenizer training."""
  out = []
  for task, item in items:
    for with_tool in (False, True):
      for m in lt.tokenizer_conversation(task, item, with_tool):
        out.append(m['content'])
        out += [chat_lib.tool_call_json(c) for c in m.get('tool_calls', ())]
  return out


def tokenizer_view(config, root, tokenizer, train_arm, seed: int) -> dict:
  """Trains one model on both tasks in both modes; accuracy by task, with and without
  the python tool, with Wilson intervals and the majority-answer baseline."""
  tc = config['tokenizer_view']
  train, test = tokenizer_items(config, seed)
  ids = [chat_lib.render(tokenizer, lt.tokenizer_conversation(t, i, w)).ids.tolist()
         for t, i in train for w in (False, True)]
  lm = train_arm(root / 'tokenizer_view', ids, tokenizer, config, tc['steps'])
  tools = {'python': registry.Tool(
      lambda code: python_sandbox.python_tool(code, timeout_s=5.0), python_sandbox.SCHEMA)}
  out = dict(train_items=len(train), test_items=len(test), by_task={})
  for with_tool in (False, True):
    prompts = [_prompt(tokenizer, lt.question(t, i) + (lt.USE_PYTHON if with_tool else ''))
               for t, i in test]
    gen = runtime.generate_with_tools(lm.params, lm.cfg, tokenizer, prompts,
                                      tools if with_tool else {}, max_new_tokens=48,
                                      max_calls=1, max_result_tokens=16)
    for r, (task, item) in enumerate(test):
      answer = lt.final_answer(tokenizer.decode(_after_tools(gen, r)[1]))
      rec = out['by_task'].setdefault(task, {}).setdefault(
          'tool' if with_tool else 'direct', dict(right=0, n=0, calls=0, examples=[]))
      rec['right'] += int(answer == lt.gold(task, item))
      rec['n'] += 1
      rec['calls'] += int(bool(gen.calls[r]))
      if len(rec['examples']) < 2:
        rec['examples'].append(dict(question=lt.question(task, item), answer=answer,
                                    gold=lt.gold(task, item),
                                    calls=[c.arguments for c in gen.calls[r]]))
  for task, recs in out['by_task'].items():
    gold_train = [lt.gold(t, i) for t, i in train if t == task]
    gold_test = [lt.gold(t, i) for t, i in test if t == task]
    majority = max(set(gold_train), key=gold_train.count)
    for rec in recs.values():
      rec['accuracy'] = rec['right'] / rec['n']
      rec['ci'] = list(evaluation.wilson_interval(rec['right'], rec['n']))
    recs['majority_baseline'] = float(np.mean([g == majority for g in gold_test]))
    if task == 'compare':
      # Comparing as strings of digits after the point ("11" > "9") is the tokenizer trap.
      recs['string_rule_baseline'] = float(np.mean(
          [max(i, key=lambda x: int(x.split('.')[1])) == lt.larger(*i)
           for t, i in test if t == task]))
  shown = ['strawberry'] + [i[0] for t, i in test if t == 'count'][:4:2] + ['9.11', '9.9']
  out['splits'] = {w: lt.token_splits(tokenizer, f' {w}') for w in shown}
  out['splits_in_question'] = {q: lt.token_splits(tokenizer, q) for q in
                               (lt.letter_question('strawberry', 'r'),
                                lt.compare_question('9.11', '9.9'))}
  return out
