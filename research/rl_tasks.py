"""Prompt sets and gold rewards for RL studies: what the policy is asked, and what it
should have answered, as plain functions of documents, token ids and texts.

  continuation_prompts   Ziegler et al. 2019's "positive continuations": the first k
                         words of held-out sentences, raw text
  hh_prompts             hh-rlhf dialogues before their last assistant turn, chat template
  make_gold              VADER compound sentiment (a gold reward that is never optimised)
  gold_labelled_pairs    2k samples per prompt -> k disjoint pairs, chosen = higher gold,
                         near-ties skipped, split by prompt (the proxy RM's data)
  load_prompts           the configured task's prompts for an init workdir
  best_of_n              best-of-n by proxy with the analytic KL (Stiennon et al. 2020)
  best_of_n_expected     its unbiased estimate from K >= n samples (Gao et al. 2022)
  sample_rows / evaluate_policy / samples_table   a policy's samples on a prompt set,
                         scored by proxy, gold and KL from a reference policy
  policy_gold_pairs      the proxy reward model's (and the pipeline's DPO) pairs: the
                         init policy's samples, labelled by gold
"""
import dataclasses
import math
import re
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from research import chat
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import evaluation
from research import preferences
from research import reward_model as rm_lib

VADER_INSTALL = 'pip install --no-deps vaderSentiment==3.3.2'


class TaskError(ValueError):
  """A prompt set or gold reward that cannot be built from the given data or config."""


def make_gold(name: str) -> Optional[Callable[[list[str]], np.ndarray]]:
  """texts -> gold rewards float32 (None for 'none'). A missing package is a TaskError."""
  if name == 'none':
    return None
  if name != 'vader':
    raise TaskError(f"gold={name!r}: expected 'vader' or 'none'")
  try:
    # pylint: disable-next=g-import-not-at-top
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  except ImportError:
    raise TaskError(f'gold=vader needs the vaderSentiment package: {VADER_INSTALL}') \
        from None
  analyzer = SentimentIntensityAnalyzer()

  def gold(texts):
    return np.asarray([analyzer.polarity_scores(t)['compound'] for t in texts], np.float32)
  return gold


@dataclasses.dataclass
class Prompts:
  """Training pool and fixed evaluation prompts: texts and token ids (no padding)."""
  train_text: list
  train_ids: list
  eval_text: list
  eval_ids: list
  stop_id: int
  note: str = ''


_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')


def sentences(text: str) -> list[str]:
  """Sentences of a document: whitespace collapsed, split after . ! or ? and a space."""
  return [s for s in _SENTENCE_END.split(' '.join(text.split())) if s]


def continuation_prompts(held_docs: Sequence, tokenizer, *, seed: int, min_sentence_words: int,
                         min_words: int, max_words: int, max_prompt_tokens: int,
                         eval_prompts: int, min_train: int) -> Prompts:
  """First k words (k uniform in [min_words, max_words]) of sentences of `held_docs`
  (documents with `.text`), deduplicated, at most `max_prompt_tokens` tokens; a seeded
  permutation puts `eval_prompts` of them in the fixed evaluation set, the rest in the
  training pool. Raises TaskError with fewer than eval_prompts + min_train prompts."""
  rng = np.random.default_rng(seed)
  seen, texts, ids = set(), [], []
  for doc in held_docs:
    for sentence in sentences(doc.text):
      words = sentence.split()
      if len(words) < min_sentence_words:
        continue
      k = int(rng.integers(min_words, max_words + 1))
      text = ' '.join(words[:min(k, len(words) - 1)])
      if text in seen:
        continue
      seen.add(text)
      encoded = tokenizer.encode_text(text)
      if 0 < len(encoded) <= max_prompt_tokens:
        texts.append(text)
        ids.append(encoded)
  order = np.random.default_rng([seed, 1]).permutation(len(texts))
  if len(texts) < eval_prompts + min_train:
    raise TaskError(f'only {len(texts)} prompts from {len(held_docs)} held-out documents: '
                    f'need data.eval_prompts={eval_prompts} + a batch of {min_train}')
  pick = lambda idx, xs: [xs[i] for i in idx]
  return Prompts(train_text=pick(order[eval_prompts:], texts),
                 train_ids=pick(order[eval_prompts:], ids),
                 eval_text=pick(order[:eval_prompts], texts),
                 eval_ids=pick(order[:eval_prompts], ids), stop_id=tokenizer.eos_id)


def hh_prompts(pairs: Sequence, tokenizer, *, heldout_fraction: float, seed: int,
               max_prompt_tokens: int, eval_prompts: int) -> Prompts:
  """hh-rlhf dialogues before their last assistant turn, rendered for generation.

  Split as the reward-model stage splits them (whole prompts, its held-out fraction
  and seed): evaluation prompts from its held-out side, the training pool from the
  rest. Rendered prompts longer than max_prompt_tokens keep their last tokens.
  """
  train, held = preferences.split_pairs(pairs, heldout_fraction, seed)

  def unique(side):
    texts, ids, seen = [], [], set()
    for pair in side:
      key = preferences.prompt_key(pair['prompt'])
      if key not in seen:
        seen.add(key)
        texts.append(pair['prompt'][-1]['content'])
        ids.append(list(chat.render(tokenizer, pair['prompt'],
                                    add_generation_prompt=True).ids[-max_prompt_tokens:]))
    return texts, ids

  train_text, train_ids = unique(train)
  eval_text, eval_ids = unique(held)
  return Prompts(train_text=train_text, train_ids=train_ids, eval_text=eval_text[:eval_prompts],
                 eval_ids=eval_ids[:eval_prompts], stop_id=tokenizer.chat_ids['end_of_turn'])


def load_prompts(config: dict, init_workdir, tokenizer) -> Prompts:
  """The task's training pool and fixed evaluation prompts, as configs/rlhf.py sets them.

  continuation: sentences of the held-out split of the init's pretraining documents
  (that run's fraction and split seed; `note` says when its corpus is not data.corpus);
  hh: hh-rlhf dialogues, split as the reward model splits them. Raises TaskError for
  data that cannot give the prompts.
  """
  dc = config['data']
  if config['task'] == 'hh':
    try:
      pairs = preferences.hh_rlhf(dc['hh_path'] or None)
    except preferences.PreferenceError as e:
      raise TaskError(str(e)) from None
    rc = config['reward_model']
    return hh_prompts(pairs, tokenizer, heldout_fraction=rc['data']['heldout_fraction'],
                      seed=rc['seed'], max_prompt_tokens=dc['max_prompt_tokens'],
                      eval_prompts=dc['eval_prompts'])
  corpus, fraction, split_seed = checkpoint_lib.pretraining_split(init_workdir,
                                                                  dc['validation_fraction'])
  note = ''
  if corpus != dc['corpus']:
    note = (f'the init\'s pretraining corpus is {corpus!r}, not {dc["corpus"]!r}: prompts come '
            f'from a {fraction} split (seed {split_seed}) of {dc["corpus"]!r}')
  _, held = data_lib.split_documents(data_lib.load_corpus(dc['corpus']), fraction,
                                     seed=split_seed)
  try:
    prompts = continuation_prompts(
        held, tokenizer, seed=config['seed'], min_sentence_words=dc['min_sentence_words'],
        min_words=dc['min_words'], max_words=dc['max_words'],
        max_prompt_tokens=dc['max_prompt_tokens'], eval_prompts=dc['eval_prompts'],
        min_train=config['ppo']['batch_size'])
  except TaskError as e:
    raise TaskError(f'{dc["corpus"]!r}: {e}') from None
  prompts.note = note
  return prompts


def encode(id_lists, width: int, rows: Optional[int] = None):
  """Token lists -> left-aligned int32 [rows, width] and lengths; missing rows copy row 0."""
  rows = rows or len(id_lists)
  prompt = np.zeros((rows, width), np.int32)
  lengths = np.ones((rows,), np.int32)
  for i in range(rows):
    ids = list(id_lists[i] if i < len(id_lists) else id_lists[0])[-width:]
    prompt[i, :len(ids)] = ids
    lengths[i] = len(ids)
  return prompt, lengths


def response_texts(tokenizer, tokens_BxN, lengths_B, stop_id) -> list[str]:
  """The decoded valid tokens of each row, the stop token left out."""
  return [tokenizer.decode([t for t in tokens_BxN[i, :lengths_B[i]] if t != stop_id])
          for i in range(len(lengths_B))]


def gold_labelled_pairs(prompts: Prompts, prompt_ids: Sequence, tokens_MxN: np.ndarray,
                        lengths_M: np.ndarray, gold_M: np.ndarray, texts: Sequence[str], *,
                        pairs_per_prompt: int, min_gap: float, close: bool, seq_len: int,
                        heldout_fraction: float, seed: int) -> tuple[tuple[dict, dict], dict]:
  """Preference pairs from 2k samples per prompt (rows [2k·i, 2k·(i+1)) are prompt i's),
  labelled by gold: samples 2j and 2j+1 of a prompt form a pair, chosen = the higher gold,
  near-ties (|Δgold| < min_gap) skipped; pairs split by prompt (all pairs of a prompt on
  one side, `heldout_fraction` of the prompts held out, seeded).

  Returns ((train arrays, held-out arrays), stats) with arrays as
  `preferences.pairs_from_token_lists` makes them (each side prompt ‖ response ‖ stop).
  Raises TaskError when pairs collide after the cut to seq_len or fewer than 2 remain.
  """
  k = pairs_per_prompt
  chosen, rejected, pair_prompt, examples = [], [], [], []
  ties = 0
  for i, ids in enumerate(prompt_ids):
    for j in range(k):
      a, c = 2 * k * i + 2 * j, 2 * k * i + 2 * j + 1
      if abs(gold_M[a] - gold_M[c]) < min_gap:
        ties += 1
        continue
      hi, lo = (a, c) if gold_M[a] > gold_M[c] else (c, a)
      seq = lambda r: rm_lib.closed(ids, tokens_MxN[r, :lengths_M[r]], prompts.stop_id, close)
      chosen.append(seq(hi))
      rejected.append(seq(lo))
      pair_prompt.append(i)
      if len(examples) < 3:
        examples.append(dict(prompt=prompts.train_text[i], chosen=texts[hi],
                             chosen_gold=float(gold_M[hi]), rejected=texts[lo],
                             rejected_gold=float(gold_M[lo])))
  arrays = preferences.pairs_from_token_lists(chosen, rejected, seq_len)
  if arrays.counts['dropped']:
    raise TaskError(f'{arrays.counts["dropped"]} pairs identical after the cut to '
                    'reward_model.data.seq_len: raise it')
  pair_prompt = np.asarray(pair_prompt, np.int64)
  used = np.unique(pair_prompt)
  order = np.random.default_rng([seed, 2]).permutation(len(used))
  held_prompts = used[order[:max(1, round(heldout_fraction * len(used)))]]
  held = np.isin(pair_prompt, held_prompts)
  held_idx, train_idx = np.flatnonzero(held), np.flatnonzero(~held)
  if len(train_idx) < 2:
    raise TaskError(f'only {len(pair_prompt)} gold-labelled pairs ({ties} near-ties of '
                    f'{len(prompt_ids) * k}): raise pairs.num_prompts or lower pairs.min_gap')
  split = lambda idx: {key: np.asarray(v)[idx] for key, v in arrays.items()}
  stats = dict(prompts=len(prompt_ids), samples=len(lengths_M), near_ties=ties,
               pairs=len(pair_prompt), train_pairs=len(train_idx), heldout_pairs=len(held_idx),
               sample_gold_mean=float(np.mean(gold_M)), sample_gold_std=float(np.std(gold_M)),
               examples=examples)
  return (split(train_idx), split(held_idx)), stats


def best_of_n_kl(n: int) -> float:
  """KL(best-of-n ‖ π) = log n − (n − 1)/n (Stiennon et al. 2020).

  Exact in the limit where every outcome is rare; an upper bound otherwise (Beirami et
  al. 2024), e.g. when duplicate samples tie.
  """
  return math.log(n) - (n - 1) / n


def best_of_n(proxy_PxK, gold_PxK, ns) -> list[dict]:
  """For each n: among the first n samples of each prompt, the one with the highest proxy.

  -> [{n, kl, sqrt_kl, proxy, gold}] with the means over prompts of the picked samples'
  proxy and gold (gold None when gold_PxK is None). The samples for n are a subset of
  those for every larger n, so the proxy mean cannot decrease with n.
  """
  proxy_PxK = np.asarray(proxy_PxK)
  rows = []
  for n in ns:
    if n > proxy_PxK.shape[1]:
      raise ValueError(f'best-of-{n} needs {n} samples per prompt, have {proxy_PxK.shape[1]}')
    pick = np.argmax(proxy_PxK[:, :n], axis=1)
    idx = np.arange(len(pick))
    kl = best_of_n_kl(n)
    rows.append(dict(n=int(n), kl=kl, sqrt_kl=math.sqrt(kl),
                     proxy=float(proxy_PxK[idx, pick].mean()),
                     gold=None if gold_PxK is None else float(np.asarray(gold_PxK)[idx,
                                                                                  pick].mean())))
  return rows


def best_of_n_expected(proxy_PxK, gold_PxK, ns) -> list[dict]:
  """Best-of-n by proxy, averaged over every n-subset of each prompt's K samples.

  The unbiased estimator of Gao et al. 2022 (appendix, after Nakano et al. 2021): with a
  prompt's samples sorted by proxy, the i-th smallest (i = 1..K) is the best of a uniform
  n-subset with probability C(i−1, n−1) / C(K, n). Ties are broken by sample order.
  -> [{n, kl, sqrt_kl, proxy, gold}] as `best_of_n`, means over prompts (gold None when
  gold_PxK is None); the KL is the analytic `best_of_n_kl(n)`. Raises ValueError for n > K.
  """
  proxy_PxK = np.asarray(proxy_PxK, np.float64)
  p, k = proxy_PxK.shape
  order_PxK = np.argsort(proxy_PxK, axis=1, kind='stable')
  sorted_proxy = np.take_along_axis(proxy_PxK, order_PxK, axis=1)
  sorted_gold = None if gold_PxK is None else np.take_along_axis(
      np.asarray(gold_PxK, np.float64), order_PxK, axis=1)
  rows = []
  for n in ns:
    if not 1 <= n <= k:
      raise ValueError(f'best-of-{n} needs {n} samples per prompt, have {k}')
    w_K = np.asarray([math.comb(i - 1, n - 1) for i in range(1, k + 1)], np.float64)
    w_K /= math.comb(k, n)
    kl = best_of_n_kl(n)
    rows.append(dict(n=int(n), kl=kl, sqrt_kl=math.sqrt(kl),
                     proxy=float((sorted_proxy @ w_K).mean()),
                     gold=None if sorted_gold is None else float((sorted_gold @ w_K).mean())))
  return rows


def sample_rows(programs, params, id_lists, *, batch: int, width: int, key,
                rm=None, ref_params=None) -> dict:
  """Samples one continuation per entry of id_lists, `batch` rows per call of
  `programs` (an object with jitted generate / score / kl, as experiments.rlhf builds).

  -> numpy dict: tokens [M, N], lengths [M], done [M]; + proxy [M] with rm=(params,
  offset); + k1, k3, entropy [M] with ref_params. Batch b draws with fold_in(key, b).
  """
  out = {k: [] for k in ('tokens', 'lengths', 'done', 'proxy', 'k1', 'k3', 'entropy')}
  for b, start in enumerate(range(0, len(id_lists), batch)):
    chunk = id_lists[start:start + batch]
    prompt, lengths = encode(chunk, width, batch)
    gen = programs.generate(params, prompt, lengths, jax.random.fold_in(key, b))
    m = len(chunk)
    out['tokens'].append(np.asarray(gen.tokens_BxN)[:m])
    out['lengths'].append(np.asarray(gen.lengths_B)[:m])
    out['done'].append(np.asarray(gen.done_B)[:m])
    if rm is not None:
      out['proxy'].append(np.asarray(programs.score(prompt, lengths, gen.tokens_BxN,
                                                    gen.valid_BxN, *rm))[:m])
    if ref_params is not None:
      k1, k3, ent = programs.kl(params, ref_params, prompt, lengths, gen.tokens_BxN,
                                gen.valid_BxN)
      out['k1'].append(np.asarray(k1)[:m])
      out['k3'].append(np.asarray(k3)[:m])
      out['entropy'].append(np.asarray(ent)[:m])
  return {k: np.concatenate(v) for k, v in out.items() if v}


def evaluate_policy(programs, params, ref_params, rm, prompts, tokenizer, gold, config) -> dict:
  """Proxy, gold (with 95 % t-intervals), KL from the reference policy (mean per-sequence
  k1, k3), entropy, length and eos fraction of one sample per fixed evaluation prompt,
  drawn with the same key at every call."""
  start = time.time()
  out = sample_rows(programs, params, prompts.eval_ids, batch=config['ppo']['batch_size'],
                    width=config['data']['max_prompt_tokens'],
                    key=jax.random.key(config['seed'] + 303), rm=rm, ref_params=ref_params)
  result = dict(proxy=float(out['proxy'].mean()), proxy_std=float(out['proxy'].std()),
                kl_k1=float(out['k1'].mean()), kl_k3=float(out['k3'].mean()),
                entropy=float(out['entropy'].mean()),
                response_length=float(out['lengths'].mean()),
                fraction_done=float(out['done'].mean()))
  result['sqrt_kl'] = math.sqrt(max(result['kl_k1'], 0.0))
  if gold is not None:
    g = gold(response_texts(tokenizer, out['tokens'], out['lengths'], prompts.stop_id))
    s = evaluation.summarize(g)
    result.update(gold=s['mean'], gold_lo=s['lo'], gold_hi=s['hi'])
  s = evaluation.summarize(out['proxy'])
  result.update(proxy_lo=s['lo'], proxy_hi=s['hi'], seconds=time.time() - start)
  return result


def samples_table(programs, params, rm, prompts, tokenizer, gold, config) -> list[dict]:
  n = config['eval']['num_samples']
  out = sample_rows(programs, params, prompts.eval_ids[:n], batch=config['ppo']['batch_size'],
                    width=config['data']['max_prompt_tokens'],
                    key=jax.random.key(config['seed'] + 404), rm=rm)
  texts = response_texts(tokenizer, out['tokens'], out['lengths'], prompts.stop_id)
  g = gold(texts) if gold is not None else [None] * len(texts)
  return [dict(prompt=p, continuation=t, proxy=float(s), gold=None if x is None else float(x))
          for p, t, s, x in zip(prompts.eval_text[:n], texts, out['proxy'], g)]


def policy_gold_pairs(programs, params, prompts: Prompts, tokenizer, gold, config: dict
                      ) -> tuple[tuple[dict, dict], dict]:
  """2k samples of a policy per training prompt (the first `pairs.num_prompts`, key
  seed + 101), paired and labelled by gold (`gold_labelled_pairs`) -> ((train arrays,
  held-out arrays), stats with fraction_done and sampling_seconds).

  Raises:
    TaskError: as `gold_labelled_pairs`.
  """
  pc = config['pairs']
  ids = prompts.train_ids[:pc['num_prompts']]
  start = time.time()
  rows = [p for p in ids for _ in range(2 * pc['pairs_per_prompt'])]
  out = sample_rows(programs, params, rows, batch=config['ppo']['batch_size'],
                    width=config['data']['max_prompt_tokens'],
                    key=jax.random.key(config['seed'] + 101))
  texts = response_texts(tokenizer, out['tokens'], out['lengths'], prompts.stop_id)
  pairs, stats = gold_labelled_pairs(
      prompts, ids, out['tokens'], out['lengths'], gold(texts), texts,
      pairs_per_prompt=pc['pairs_per_prompt'], min_gap=pc['min_gap'],
      close=config['score_with_stop'], seq_len=config['reward_model']['data']['seq_len'],
      heldout_fraction=pc['heldout_fraction'], seed=config['seed'])
  stats.update(fraction_done=float(out['done'].mean()), sampling_seconds=time.time() - start)
  return pairs, stats
