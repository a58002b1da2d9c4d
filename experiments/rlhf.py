"""RLHF: a reward model from preferences, PPO against it, best-of-n, over-optimisation.

  python -m experiments.rlhf --config=configs/rlhf.py --init=runs/sft --workdir=runs/rlhf

The default task is Ziegler et al. 2019's "positive continuations" at toy scale:

  prompts     the first 4-8 words of sentences of *held-out* State of the Union addresses
              (the init's pretraining validation documents), raw text, no chat template;
              a fixed set of them is the evaluation set, the rest the training pool;
  gold        VADER compound sentiment of the decoded continuation (in [-1, 1]): the
              "true" preference, measured everywhere and never optimised;
  proxy       a reward model (init params + a scalar head, Bradley-Terry) trained by
              experiments.reward_model on pairs of the init policy's own continuations of
              training prompts, labelled by gold (near-ties skipped), prompt-disjoint
              held-out accuracy reported;
  PPO         research/ppo.py's jitted iteration (rollout, proxy score, GAE with the value
              model initialised from the reward model, clipped updates, adaptive KL
              penalty to the init policy), one seeded, resumable prompt iterator;
  best-of-n   for n = 1..16, n samples of the init policy per evaluation prompt, the one
              the proxy scores highest: its proxy and gold, at the analytic
              KL(best-of-n ‖ π) = log n − (n − 1)/n;
  evaluation  at the start and every `eval.every` iterations, on the fixed evaluation
              prompts (the same sampling key every time): proxy and gold means, KL from
              the init policy (mean per-sequence k1 on the policy's samples), entropy.

The over-optimisation plot (Gao et al. 2022) puts proxy and gold against sqrt(KL) for the
PPO checkpoints and for best-of-n. Outputs in WORKDIR: metrics.jsonl (every PPO metric
of every iteration, + gold, proxy, sqrt KL, seconds; `eval/` rows), report.md with tables,
plots and samples, summary.json, reward_model/ (the proxy), and policy/, the final policy
as a stage (`checkpoint.load_stage(WORKDIR/policy)`, `experiments.sample`/`chat`).

The PPO state (policy, value, optimiser states, β, rng, step) and the prompt iterator's
position are checkpointed with Orbax every `checkpoint_every` iterations and at the end;
a killed run resumes exactly (metrics.jsonl rows after the checkpoint are dropped and
recomputed identically). SIGTERM / Ctrl-C save and exit at the next iteration boundary.

`hh` preset: hh-rlhf prompts through the chat template, the reward model of an hh-rlhf
experiments.reward_model run, stop at end_of_turn, no gold reward.
"""
import dataclasses
import functools
import json
import math
import pathlib
import re
import shutil
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments import pretrain
from experiments import reward_model as rm_experiment
from research import chat
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import evaluation
from research import model as model_lib
from research import ppo
from research import preferences
from research import reward_model as rm_lib
from research import sampling

VADER_INSTALL = 'pip install --no-deps vaderSentiment==3.3.2'
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}
RM_SUMMARY = 'reward_model_summary.json'
BEST_OF_N = 'best_of_n.json'
POLICY_DIR = 'policy'
PPO_FIELDS = tuple(f.name for f in dataclasses.fields(ppo.PPOConfig))


# --------------------------------------------------------------------------------------
# Gold reward
# --------------------------------------------------------------------------------------


def make_gold(name: str) -> Optional[Callable[[list[str]], np.ndarray]]:
  """texts -> gold rewards float32 (None for 'none'). A missing package is a UserError."""
  if name == 'none':
    return None
  if name != 'vader':
    raise common.UserError(f"gold={name!r}: expected 'vader' or 'none'")
  try:
    # pylint: disable-next=g-import-not-at-top
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  except ImportError:
    raise common.UserError(f'gold=vader needs the vaderSentiment package: {VADER_INSTALL}') \
        from None
  analyzer = SentimentIntensityAnalyzer()

  def gold(texts):
    return np.asarray([analyzer.polarity_scores(t)['compound'] for t in texts], np.float32)
  return gold


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


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


def pretraining_split(init_workdir, default_fraction: float) -> tuple[Optional[str], float, int]:
  """(corpus, validation fraction, split seed) of the pretraining run behind an init.

  Follows the `init` links of SFT-like configs to the first config with `data.corpus`;
  (None, default_fraction, 0) when there is none.
  """
  workdir = pathlib.Path(init_workdir)
  for _ in range(8):
    config = checkpoint_lib.load_config(workdir)
    if config is None:
      break
    dc = config.get('data', {})
    if 'corpus' in dc:
      return dc['corpus'], dc.get('validation_fraction', default_fraction), \
          dc.get('split_seed', config.get('seed', 0))
    if not config.get('init'):
      break
    workdir = pathlib.Path(config['init'])
  return None, default_fraction, 0


def continuation_prompts(config: dict, init_workdir, tokenizer) -> Prompts:
  """First k words (k uniform in [min_words, max_words]) of held-out sentences."""
  dc = config['data']
  corpus, fraction, split_seed = pretraining_split(init_workdir, dc['validation_fraction'])
  note = ''
  if corpus != dc['corpus']:
    note = (f'the init\'s pretraining corpus is {corpus!r}, not {dc["corpus"]!r}: prompts come '
            f'from a {fraction} split (seed {split_seed}) of {dc["corpus"]!r}')
    common.log(f'note: {note}')
  docs = data_lib.load_corpus(dc['corpus'])
  _, held = data_lib.split_documents(docs, fraction, seed=split_seed)
  rng = np.random.default_rng(config['seed'])
  seen, texts, ids = set(), [], []
  for doc in held:
    for sentence in sentences(doc.text):
      words = sentence.split()
      if len(words) < dc['min_sentence_words']:
        continue
      k = int(rng.integers(dc['min_words'], dc['max_words'] + 1))
      text = ' '.join(words[:min(k, len(words) - 1)])
      if text in seen:
        continue
      seen.add(text)
      encoded = tokenizer.encode(text)
      if 0 < len(encoded) <= dc['max_prompt_tokens']:
        texts.append(text)
        ids.append(encoded)
  order = np.random.default_rng([config['seed'], 1]).permutation(len(texts))
  n_eval = dc['eval_prompts']
  if len(texts) < n_eval + config['ppo']['batch_size']:
    raise common.UserError(f'only {len(texts)} prompts from {len(held)} held-out documents of '
                           f'{dc["corpus"]!r}: need data.eval_prompts={n_eval} + a batch')
  pick = lambda idx, xs: [xs[i] for i in idx]
  return Prompts(train_text=pick(order[n_eval:], texts), train_ids=pick(order[n_eval:], ids),
                 eval_text=pick(order[:n_eval], texts), eval_ids=pick(order[:n_eval], ids),
                 stop_id=tokenizer.eos_id, note=note)


def hh_prompts(config: dict, tokenizer) -> Prompts:
  """hh-rlhf dialogues before their last assistant turn, rendered for generation.

  Split as experiments.reward_model splits them (whole prompts, its held-out fraction
  and seed): evaluation prompts from its held-out side, the training pool from the rest.
  Rendered prompts longer than data.max_prompt_tokens keep their last tokens.
  """
  try:
    pairs = preferences.hh_rlhf(config['data']['hh_path'] or None)
  except preferences.PreferenceError as e:
    raise common.UserError(str(e)) from None
  rc = config['reward_model']
  train, held = preferences.split_pairs(pairs, rc['data']['heldout_fraction'], rc['seed'])
  limit = config['data']['max_prompt_tokens']

  def unique(side):
    texts, ids, seen = [], [], set()
    for pair in side:
      key = preferences.prompt_key(pair['prompt'])
      if key not in seen:
        seen.add(key)
        texts.append(pair['prompt'][-1]['content'])
        ids.append(list(chat.render(tokenizer, pair['prompt'],
                                    add_generation_prompt=True).ids[-limit:]))
    return texts, ids

  train_text, train_ids = unique(train)
  eval_text, eval_ids = unique(held)
  n_eval = config['data']['eval_prompts']
  return Prompts(train_text=train_text, train_ids=train_ids, eval_text=eval_text[:n_eval],
                 eval_ids=eval_ids[:n_eval], stop_id=tokenizer.chat_ids['end_of_turn'])


class PromptIterator:
  """Prompt indices in a new seeded permutation every epoch; its state is one integer."""

  def __init__(self, n: int, seed: int, position: int = 0):
    self.n, self.seed, self.position = n, seed, position
    self._perms = {}

  def _perm(self, epoch):
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
    return self._perms[epoch]

  def take(self, k: int) -> np.ndarray:
    out = []
    for _ in range(k):
      epoch, i = divmod(self.position, self.n)
      out.append(self._perm(epoch)[i])
      self.position += 1
    return np.asarray(out)


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


# --------------------------------------------------------------------------------------
# Jitted sampling, scoring and KL (one batch shape: ppo.batch_size × P, N new tokens)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _generate_fn(policy_cfg, n: int, stop_id: int, pad_id: int, fast: bool):
  def generate(params, prompt, lengths, rng):
    return sampling.generate(params, prompt, lengths, rng, cfg=policy_cfg, max_new_tokens=n,
                             eos_id=stop_id, pad_id=pad_id, temperature=1.0)
  return jax.jit(generate, compiler_options=FAST_COMPILE if fast else None)


@functools.lru_cache(maxsize=8)
def _kl_fn(policy_cfg, n: int, pad_id: int, fast: bool):
  """(params, ref params, rollout) -> per-sequence k1, k3 and mean entropy per token."""
  def kl(params, ref_params, prompt, lengths, tokens, valid):
    seq = ppo.sequence_from_rollout(prompt, lengths, tokens, valid, pad_id)
    model = model_lib.Transformer(policy_cfg)
    p = prompt.shape[1]
    logp, entropy = ppo.response_logprobs_and_entropy(params, model, seq, p, n)
    ref_logp, _ = ppo.response_logprobs_and_entropy(ref_params, model, seq, p, n)
    k1 = jnp.sum(jnp.where(valid, logp - ref_logp, 0.0), axis=1)
    k3 = jnp.sum(jnp.where(valid, ppo.kl_k3(logp, ref_logp), 0.0), axis=1)
    ent = jnp.sum(jnp.where(valid, entropy, 0.0), axis=1) / jnp.maximum(jnp.sum(valid, 1), 1)
    return k1, k3, ent
  return jax.jit(kl, compiler_options=FAST_COMPILE if fast else None)


def make_reward_fn(rm_model, stop_id: int, pad_id: int = 0, close: bool = True):
  """PPO's `reward_fn(prompt, lengths, response, valid, rm_params, offset) -> score_B`.

  The reward model's normalised score of prompt ‖ response; with `close`, a response
  that did not end with the stop token is scored with one appended (the reward model
  always reads its score at a stop token, as on its training pairs; see `closed`).
  """
  def reward_fn(prompt_BxP, lengths_B, response_BxN, valid_BxN, rm_params, offset=0.0):
    tokens_BxT, total_B = rm_lib.pack_prompt_response(prompt_BxP, lengths_B, response_BxN,
                                                       valid_BxN, pad_id)
    if close:
      b = tokens_BxT.shape[0]
      rows = jnp.arange(b)
      tokens_BxT = jnp.pad(tokens_BxT, ((0, 0), (0, 1)), constant_values=pad_id)
      add_B = tokens_BxT[rows, total_B - 1] != stop_id
      tokens_BxT = tokens_BxT.at[rows, total_B].set(
          jnp.where(add_B, stop_id, tokens_BxT[rows, total_B]))
      total_B = total_B + add_B.astype(jnp.int32)
    scores = rm_lib.sequence_scores(rm_params, rm_model, tokens_BxT, total_B)
    return rm_lib.normalized(scores, offset)
  return reward_fn


def closed(prompt_ids, response_ids, stop_id: int, close: bool = True) -> list:
  """prompt ‖ response (‖ stop when the response does not end with it and `close`)."""
  seq = list(prompt_ids) + list(response_ids)
  if close and (not len(response_ids) or response_ids[-1] != stop_id):
    seq.append(stop_id)
  return seq


@functools.lru_cache(maxsize=8)
def _score_fn(rm_cfg, stop_id: int, pad_id: int, close: bool, fast: bool):
  return jax.jit(make_reward_fn(model_lib.Transformer(rm_cfg), stop_id, pad_id, close),
                 compiler_options=FAST_COMPILE if fast else None)


@dataclasses.dataclass
class Programs:
  """The jitted pieces outside the PPO iteration (cached: one compile per shape and model).

  generate(params, prompt, lengths, rng) -> Generation at temperature 1;
  kl(params, ref_params, prompt, lengths, tokens, valid) -> (k1, k3, entropy) per row;
  score(rm_params, offset, prompt, lengths, tokens, valid) -> proxy per row (None before
  the reward model exists).
  """
  generate: Callable
  kl: Callable
  score: Optional[Callable] = None

  @classmethod
  def make(cls, policy_cfg, rm_cfg, n: int, stop_id: int, pad_id: int, close: bool, fast: bool):
    return cls(generate=_generate_fn(policy_cfg, n, stop_id, pad_id, fast),
               kl=_kl_fn(policy_cfg, n, pad_id, fast),
               score=None if rm_cfg is None else _score_fn(rm_cfg, stop_id, pad_id, close, fast))


@functools.lru_cache(maxsize=4)
def _iteration_fn(policy_cfg, rm_cfg, cfg: ppo.PPOConfig, policy_lr: float, value_lr: float,
                  grad_clip: float, stop_id: int, pad_id: int, close: bool, fast: bool):
  """-> (jitted PPO iteration, tx_policy, tx_value); cached so a process compiles it once."""
  grpo = cfg.advantage == 'grpo'
  tx_policy = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(policy_lr))
  tx_value = None if grpo else optax.chain(optax.clip_by_global_norm(grad_clip),
                                           optax.adam(value_lr))
  rm_model = model_lib.Transformer(rm_cfg)
  iteration = ppo.make_ppo_iteration(
      model_lib.Transformer(policy_cfg), None if grpo else rm_model, None,
      make_reward_fn(rm_model, stop_id, pad_id, close), tx_policy, tx_value, cfg, stop_id,
      pad_id=pad_id)
  return (jax.jit(iteration, donate_argnums=0, compiler_options=FAST_COMPILE if fast else None),
          tx_policy, tx_value)


def sample_rows(programs: Programs, params, id_lists, *, batch: int, width: int, key,
                rm=None, ref_params=None) -> dict:
  """Samples one continuation per entry of id_lists, `batch` rows per call.

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


# --------------------------------------------------------------------------------------
# The proxy reward model
# --------------------------------------------------------------------------------------


def gold_pairs(programs, params, prompts: Prompts, tokenizer, gold, config) -> tuple[dict, dict]:
  """2k samples of the init policy per prompt, k disjoint pairs, labelled by gold.

  -> (pairs, stats). pairs: (train arrays, held-out arrays) for experiments.reward_model.
  train, split by prompt (all pairs of a prompt on one side); chosen = the higher gold,
  near-ties (|Δgold| < pairs.min_gap) skipped. stats: counts and examples for the report.
  """
  pc = config['pairs']
  ids = prompts.train_ids[:pc['num_prompts']]
  k = pc['pairs_per_prompt']
  b = config['ppo']['batch_size']
  start = time.time()
  rows = [p for p in ids for _ in range(2 * k)]  # prompt i: rows [2k·i, 2k·(i+1))
  out = sample_rows(programs, params, rows, batch=b, width=config['data']['max_prompt_tokens'],
                    key=jax.random.key(config['seed'] + 101))
  texts = response_texts(tokenizer, out['tokens'], out['lengths'], prompts.stop_id)
  g = gold(texts)
  chosen, rejected, pair_prompt, examples = [], [], [], []
  ties = 0
  for i, prompt_ids in enumerate(ids):
    for j in range(k):
      a, c = 2 * k * i + 2 * j, 2 * k * i + 2 * j + 1
      if abs(g[a] - g[c]) < pc['min_gap']:
        ties += 1
        continue
      hi, lo = (a, c) if g[a] > g[c] else (c, a)
      seq = lambda r: closed(prompt_ids, out['tokens'][r, :out['lengths'][r]], prompts.stop_id,
                             config['score_with_stop'])
      chosen.append(seq(hi))
      rejected.append(seq(lo))
      pair_prompt.append(i)
      if len(examples) < 3:
        examples.append(dict(prompt=prompts.train_text[i], chosen=texts[hi],
                             chosen_gold=float(g[hi]), rejected=texts[lo],
                             rejected_gold=float(g[lo])))
  arrays = preferences.pairs_from_token_lists(chosen, rejected,
                                              config['reward_model']['data']['seq_len'])
  if arrays.counts['dropped']:
    raise common.UserError(f'{arrays.counts["dropped"]} pairs identical after the cut to '
                           'reward_model.data.seq_len: raise it')
  pair_prompt = np.asarray(pair_prompt, np.int64)
  used = np.unique(pair_prompt)
  order = np.random.default_rng([config['seed'], 2]).permutation(len(used))
  held_prompts = used[order[:max(1, round(pc['heldout_fraction'] * len(used)))]]
  held = np.isin(pair_prompt, held_prompts)
  held_idx, train_idx = np.flatnonzero(held), np.flatnonzero(~held)
  if len(train_idx) < 2:
    raise common.UserError(f'only {len(pair_prompt)} gold-labelled pairs ({ties} near-ties of '
                           f'{len(ids) * k}): raise pairs.num_prompts or lower pairs.min_gap')
  split = lambda idx: {key: np.asarray(v)[idx] for key, v in arrays.items()}
  stats = dict(prompts=len(ids), samples=len(rows), near_ties=ties, pairs=len(pair_prompt),
               train_pairs=len(train_idx), heldout_pairs=len(held_idx),
               sample_gold_mean=float(g.mean()), sample_gold_std=float(g.std()),
               fraction_done=float(out['done'].mean()), examples=examples,
               sampling_seconds=time.time() - start)
  return (split(train_idx), split(held_idx)), stats


def heldout_summary(rm_summary: dict) -> dict:
  """The held-out part of an experiments.reward_model summary."""
  h = rm_summary.get('heldout') or {}
  return dict(accuracy=h.get('accuracy'), interval=h.get('interval'), margin=h.get('margin'),
              n=h.get('n'))


def reward_stage(config, workdir: pathlib.Path, init_workdir, policy_params, programs_fn,
                 prompts, tokenizer, gold) -> Optional[tuple[Any, Any, float, dict]]:
  """Trains (or loads) the proxy -> (rm params, rm cfg, offset, summary for the report);
  None when its training was interrupted."""
  external = config['reward_model_workdir']
  rm_dir = pathlib.Path(external) if external else workdir / 'reward_model'
  record_path = workdir / RM_SUMMARY
  if external:
    record = {'workdir': str(rm_dir), 'trained_here': False}
    if (rm_dir / rm_experiment.SUMMARY_FILE).exists():
      rm_summary = json.loads((rm_dir / rm_experiment.SUMMARY_FILE).read_text())
      record.update(heldout=heldout_summary(rm_summary), minutes=rm_summary.get('minutes'))
  elif record_path.exists():
    record = json.loads(record_path.read_text())
  else:
    rm_config = dict(config['reward_model'], init=str(init_workdir))
    pairs, stats = None, {}
    if config['task'] == 'continuation':
      common.log(f'reward model data: {2 * config["pairs"]["pairs_per_prompt"]} samples of the '
                 'init policy for each of '
                 f'{min(config["pairs"]["num_prompts"], len(prompts.train_ids))} prompts, '
                 'labelled by gold')
      pairs, stats = gold_pairs(programs_fn(None), policy_params, prompts, tokenizer, gold,
                                config)
      common.log(f'  {stats["pairs"]} pairs ({stats["near_ties"]} near-ties skipped), '
                 f'{stats["train_pairs"]} train / {stats["heldout_pairs"]} held out; '
                 f'{stats["sampling_seconds"]:.0f}s')
    summary = rm_experiment.train(rm_config, rm_dir, init_workdir, pairs=pairs)
    if summary.get('interrupted'):
      return None
    record = dict(workdir=str(rm_dir), trained_here=True, pairs=stats,
                  heldout=heldout_summary(summary), minutes=summary.get('minutes'),
                  summary=summary)
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(record_path, record)
  rm_params, rm_cfg, rm_tokenizer, offset = rm_experiment.load_reward_model(rm_dir)
  if rm_tokenizer.fingerprint != tokenizer.fingerprint:
    raise common.UserError(f'reward model {rm_dir} uses another tokenizer than the init policy')
  if not isinstance(rm_cfg, model_lib.TransformerConfig):
    rm_cfg = model_lib.TransformerConfig.from_dict(rm_cfg)
  return rm_params, rm_cfg, float(offset), record


# --------------------------------------------------------------------------------------
# Best-of-n
# --------------------------------------------------------------------------------------


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


def run_best_of_n(programs, params, prompts, tokenizer, gold, rm, config) -> dict:
  ns = tuple(config['eval']['best_of_n'])
  k = max(ns)
  start = time.time()
  ids = [p for p in prompts.eval_ids for _ in range(k)]  # prompt i: rows [i·k, (i+1)·k)
  out = sample_rows(programs, params, ids, batch=config['ppo']['batch_size'],
                    width=config['data']['max_prompt_tokens'],
                    key=jax.random.key(config['seed'] + 202), rm=rm)
  p = len(prompts.eval_ids)
  proxy = out['proxy'].reshape(p, k)
  gold_PxK = None
  if gold is not None:
    gold_PxK = gold(response_texts(tokenizer, out['tokens'], out['lengths'],
                                   prompts.stop_id)).reshape(p, k)
  return dict(rows=best_of_n(proxy, gold_PxK, ns), prompts=p, samples_per_prompt=k,
              seconds=time.time() - start)


# --------------------------------------------------------------------------------------
# PPO state checkpoints
# --------------------------------------------------------------------------------------


def state_tree(state: ppo.PPOState) -> dict:
  """The PPO state as a plain dict Orbax saves (rng as key data; no None entries)."""
  tree = dict(policy_params=state.policy_params, policy_opt_state=state.policy_opt_state,
              beta=state.beta, step=state.step, rng=jax.random.key_data(state.rng))
  if state.value_params is not None:
    tree.update(value_params=state.value_params, value_opt_state=state.value_opt_state)
  return tree


def state_from_tree(tree: dict) -> ppo.PPOState:
  return ppo.PPOState(policy_params=tree['policy_params'],
                      policy_opt_state=tree['policy_opt_state'],
                      value_params=tree.get('value_params'),
                      value_opt_state=tree.get('value_opt_state'), beta=tree['beta'],
                      step=tree['step'], rng=jax.random.wrap_key_data(tree['rng']))


def abstract_tree(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def truncate_metrics(workdir: pathlib.Path, step: int) -> None:
  """Drops metrics.jsonl rows after `step` (written after the checkpoint a run resumes)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line)['step'] <= step]
  tmp = path.with_suffix('.tmp')
  tmp.write_text(''.join(line + '\n' for line in kept))
  tmp.replace(path)


def save_policy_stage(workdir: pathlib.Path, init_workdir, init_config: dict, params, step: int,
                      tokenizer) -> pathlib.Path:
  """WORKDIR/policy: config.json (the init's), tokenizer.model, a params checkpoint."""
  out = workdir / POLICY_DIR
  out.mkdir(parents=True, exist_ok=True)
  config = dict(init_config, init=str(init_workdir), rlhf=str(workdir))
  checkpoint_lib.write_json_atomic(out / checkpoint_lib.CONFIG_FILE, config)
  shutil.copyfile(pathlib.Path(init_workdir) / checkpoint_lib.TOKENIZER_FILE,
                  out / checkpoint_lib.TOKENIZER_FILE)
  ckpt = checkpoint_lib.Checkpointer(out, keep=1, async_save=False)
  try:
    if ckpt.latest_step() != step:
      ckpt.save(step, {'params': params}, None,
                dict(step=step, tokenizer_fingerprint=tokenizer.fingerprint, rlhf=str(workdir)))
      ckpt.wait()
  finally:
    ckpt.close()
  return out


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def evaluate(programs, params, ref_params, rm, prompts, tokenizer, gold, config) -> dict:
  """Proxy, gold, KL from the init policy on the fixed evaluation prompts (same key always)."""
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


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def ppo_config(config: dict) -> ppo.PPOConfig:
  pc = config['ppo']
  return ppo.PPOConfig(**{k: pc[k] for k in PPO_FIELDS})


def check_config(config: dict, policy_cfg) -> None:
  pc, dc = config['ppo'], config['data']
  try:
    cfg = ppo_config(config)
  except ValueError as e:
    raise common.UserError(str(e)) from None
  if config['task'] not in ('continuation', 'hh'):
    raise common.UserError(f"task={config['task']!r}: expected 'continuation' or 'hh'")
  if pc['batch_size'] % pc['minibatches']:
    raise common.UserError(f'ppo.batch_size={pc["batch_size"]} is not divisible by '
                           f'ppo.minibatches={pc["minibatches"]}')
  if cfg.advantage == 'grpo' and pc['batch_size'] % cfg.group_size:
    raise common.UserError(f'ppo.batch_size={pc["batch_size"]} is not a multiple of '
                           f'ppo.group_size={cfg.group_size}')
  if policy_cfg.position == 'learned' and dc['max_prompt_tokens'] + pc['max_new_tokens'] > \
      policy_cfg.max_len:
    raise common.UserError('data.max_prompt_tokens + ppo.max_new_tokens exceed the model\'s '
                           f'{policy_cfg.max_len} positions')
  if config['task'] == 'continuation' and config['gold'] == 'none' and \
      not config['reward_model_workdir']:
    raise common.UserError('the continuation task labels its reward-model pairs by gold: set '
                           'gold=vader or give reward_model_workdir')
  if min(config['eval']['best_of_n']) < 1:
    raise common.UserError('eval.best_of_n: every n must be >= 1')


def run(config, workdir, init_workdir, *, stop_after: Optional[int] = None) -> dict:
  """The whole experiment (resumable). `stop_after`: return after that many PPO iterations
  of this call without a final save, as a kill would (for tests)."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  config = json.loads(json.dumps(config))  # tuples -> lists, as config.json holds them
  workdir = pathlib.Path(workdir)
  t_start = time.time()
  gold = make_gold(config['gold'])
  if not init_workdir:
    raise common.UserError('no init workdir: pass --init=runs/sft (an SFT or pretraining run)')
  init_params, init_config, tokenizer = checkpoint_lib.load_stage(init_workdir)
  policy_cfg = model_lib.TransformerConfig.from_dict(init_config['model'])
  if policy_cfg.scalar_head:
    raise common.UserError(f'{init_workdir} holds a reward/value model, not a policy')
  check_config(config, policy_cfg)
  config['init'] = str(init_workdir)
  config['model'] = init_config['model']
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, config, workdir,
                                    keys=('model', 'data', 'pairs', 'reward_model'))
    for key in ('init', 'task', 'gold', 'score_with_stop', 'reward_model_workdir', 'seed'):
      if saved.get(key) != config[key]:
        raise checkpoint_lib.CheckpointError(
            f'workdir {workdir} holds a run with {key}={saved.get(key)!r}, not '
            f'{config[key]!r}: use a new --workdir')
  workdir.mkdir(parents=True, exist_ok=True)
  if saved is None and jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)

  prompts = (continuation_prompts(config, init_workdir, tokenizer) if config['task'] ==
             'continuation' else hh_prompts(config, tokenizer))
  common.log(f'prompts: {len(prompts.train_ids)} training, {len(prompts.eval_ids)} evaluation '
             f'({config["task"]}); e.g. {prompts.eval_text[0]!r}')
  pc = config['ppo']
  fast = config['fast_compile']
  n, width, b = pc['max_new_tokens'], config['data']['max_prompt_tokens'], pc['batch_size']
  programs_fn = functools.partial(Programs.make, policy_cfg, n=n, stop_id=prompts.stop_id,
                                  pad_id=tokenizer.pad_id, close=config['score_with_stop'],
                                  fast=fast)

  # 1. The proxy reward model.
  t0 = time.time()
  stage = reward_stage(config, workdir, init_workdir, init_params, programs_fn, prompts,
                       tokenizer, gold)
  if stage is None:
    common.log('reward model training was interrupted: run again to resume')
    return dict(step=0, interrupted=True)
  rm_params, rm_cfg, offset, rm_record = stage
  acc = rm_record.get('heldout', {}).get('accuracy')
  common.log(f'reward model {rm_record["workdir"]}: held-out accuracy '
             f'{acc if acc is None else round(acc, 3)}, offset {offset:.3f} '
             f'({time.time() - t0:.0f}s)')
  programs = programs_fn(rm_cfg)
  rm = (rm_params, offset)
  ref_params = init_params

  # 2. Best-of-n from the init policy (once; kept in the workdir).
  bon_path = workdir / BEST_OF_N
  if bon_path.exists():
    bon = json.loads(bon_path.read_text())
  else:
    bon = run_best_of_n(programs, ref_params, prompts, tokenizer, gold, rm, config)
    if jax.process_index() == 0:
      checkpoint_lib.write_json_atomic(bon_path, bon)
    common.log('best-of-n: ' + ', '.join(
        f'n={r["n"]} proxy {r["proxy"]:.3f}' + ('' if r['gold'] is None else
                                                f' gold {r["gold"]:.3f}')
        for r in bon['rows']) + f' ({bon["seconds"]:.0f}s)')

  # 3. PPO.
  cfg = ppo_config(config)
  grpo = cfg.advantage == 'grpo'
  iteration, tx_policy, tx_value = _iteration_fn(
      policy_cfg, rm_cfg, cfg, float(pc['policy_lr']), float(pc['value_lr']),
      float(pc['grad_clip']), prompts.stop_id, tokenizer.pad_id, config['score_with_stop'], fast)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # separate buffers: the state is donated
  state = ppo.init_ppo_state(copy(init_params), tx_policy, cfg,
                             jax.random.fold_in(jax.random.key(config['seed']), 7),
                             value_params=None if grpo else copy(rm_params), tx_value=tx_value)
  # Committed to the device like a restored state, so a resumed run reuses the compile.
  state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))

  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config['keep_checkpoints'])
  prompt_iter = PromptIterator(len(prompts.train_ids), config['seed'])
  evals, timing = [], dict(ppo_seconds=0.0, eval_seconds=0.0, compile_seconds=0.0)
  latest = ckpt.latest_step()
  if latest is not None:
    restored, meta = ckpt.restore(latest, abstract_tree(state_tree(state)))
    checkpoint_lib.check_tokenizer(meta, tokenizer, workdir)
    state = state_from_tree(restored)
    prompt_iter.position = meta['prompt_position']
    evals, timing = meta['evals'], meta['timing']
    truncate_metrics(workdir, latest)
    common.log(f'resumed PPO from iteration {latest}')
  else:
    truncate_metrics(workdir, -1)  # rows of a run killed before its first checkpoint

  writer = common.MetricWriter(workdir)
  stop = pretrain._Stop()  # pylint: disable=protected-access
  per_iteration = b // cfg.group_size if grpo else b
  step = int(state.step)
  progress = common.Progress(pc['iterations'], step)
  every = max(config['eval']['every'], 1)

  def meta():
    return dict(step=step, prompt_position=prompt_iter.position, evals=evals, timing=timing,
                tokenizer_fingerprint=tokenizer.fingerprint, seed=config['seed'])

  def run_eval():
    t = time.time()
    e = evaluate(programs, state.policy_params, ref_params, rm, prompts, tokenizer, gold, config)
    # One rollout batch alone, already compiled: the sampling share of an iteration.
    prompt, lengths = encode(prompts.eval_ids, width, b)
    start = time.perf_counter()
    jax.block_until_ready(programs.generate(state.policy_params, prompt, lengths,
                                            jax.random.key(0)))
    e['seconds_sample_batch'] = time.perf_counter() - start
    e['iteration'] = step
    evals.append(e)
    timing['eval_seconds'] += time.time() - t
    writer.write(step, e, prefix='eval/')
    common.log(f'\neval @ {step}: proxy {e["proxy"]:.3f}' +
               ('' if gold is None else f', gold {e["gold"]:.3f}') +
               f', KL {e["kl_k1"]:.2f} (sqrt {e["sqrt_kl"]:.2f}), entropy {e["entropy"]:.2f}')

  killed = False
  try:
    if not evals:
      run_eval()
    done_here = 0
    while step < pc['iterations']:
      idx = prompt_iter.take(per_iteration)
      prompt, lengths = encode([prompts.train_ids[i] for i in idx], width)
      if grpo:
        prompt, lengths = ppo.repeat_prompts(prompt, lengths, cfg.group_size)
      t = time.perf_counter()
      state, metrics, rollout = iteration(state, prompt, lengths, ref_params, reward_args=rm)
      metrics = jax.device_get(metrics)
      gen = jax.device_get(rollout.generation)
      seconds = time.perf_counter() - t
      if step == 0 or done_here == 0:
        timing['compile_seconds'] += seconds  # the first call of a process compiles
      else:
        timing['ppo_seconds'] += seconds
      step += 1
      done_here += 1
      row = {k: float(v) for k, v in metrics.items()}
      row.update(proxy=row['score_mean'], sqrt_kl=math.sqrt(max(row['kl_k1'], 0.0)),
                 seconds_iteration=seconds, prompt_position=prompt_iter.position)
      if gold is not None:
        t = time.perf_counter()
        g = gold(response_texts(tokenizer, np.asarray(gen.tokens_BxN), np.asarray(gen.lengths_B),
                                prompts.stop_id))
        row.update(gold=float(g.mean()), gold_std=float(g.std()),
                   seconds_gold=time.perf_counter() - t)
      writer.write(step, row, prefix='train/')
      progress.update(step, f'proxy {row["proxy"]:.3f}' +
                      ('' if gold is None else f' gold {row["gold"]:.3f}') +
                      f' KL {row["kl_k1"]:.2f} beta {row["beta"]:.3f} {seconds:.1f}s/it')
      if step % every == 0 or step == pc['iterations']:
        run_eval()
      if stop_after is not None and done_here >= stop_after:
        killed = True
        break
      if step % config['checkpoint_every'] == 0 or step == pc['iterations']:
        ckpt.save(step, state_tree(state), None, meta())
      if stop.requested:
        break
    if not killed:
      if ckpt.latest_step() != step:
        ckpt.save(step, state_tree(state), None, meta())
      ckpt.wait()
  finally:
    stop.restore()
    ckpt.close()
    writer.close()
  if killed or step < pc['iterations']:
    common.log(f'stopped at iteration {step} of {pc["iterations"]}: run again to resume')
    return dict(step=step, interrupted=True)

  # 4. The final policy as a stage, samples, plots, report.
  policy_dir = save_policy_stage(workdir, init_workdir, init_config, state.policy_params, step,
                                 tokenizer)
  before = samples_table(programs, ref_params, rm, prompts, tokenizer, gold, config)
  after = samples_table(programs, state.policy_params, rm, prompts, tokenizer, gold, config)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()
          if line.strip()]
  train_rows = [r for r in rows if 'train/kl_k1' in r]
  plots = make_plots(workdir, evals, bon['rows'], train_rows, gold is not None,
                     cfg.kl_target if cfg.adaptive_kl else None)
  iter_seconds = [r['train/seconds_iteration'] for r in train_rows[1:]] or \
      [r['train/seconds_iteration'] for r in train_rows]
  sample_seconds = [e['seconds_sample_batch'] for e in evals]
  summary = dict(
      init=str(init_workdir), preset=config['preset'], task=config['task'],
      iterations=step, batch_size=b, max_new_tokens=n, advantage=cfg.advantage,
      prompts=dict(train=len(prompts.train_ids), eval=len(prompts.eval_ids)),
      reward_model=dict(workdir=rm_record['workdir'], heldout=rm_record.get('heldout'),
                        trained_here=rm_record.get('trained_here'),
                        offset=offset, pairs=rm_record.get('pairs'),
                        minutes=rm_record.get('minutes')),
      start=evals[0], end=evals[-1], evals=evals, best_of_n=bon['rows'],
      samples=dict(before=before, after=after), policy_workdir=str(policy_dir),
      seconds_per_iteration=statistics.median(iter_seconds),
      seconds_sample_batch=statistics.median(sample_seconds),
      timing=timing, best_of_n_seconds=bon.get('seconds'), final_beta=float(state.beta),
      wall_minutes_this_call=(time.time() - t_start) / 60,
      # Stages of this workdir (an external reward model's training is not counted).
      wall_minutes=(((rm_record.get('minutes') or 0) if rm_record.get('trained_here') else 0) +
                    (rm_record.get('pairs') or {}).get('sampling_seconds', 0) / 60 +
                    (bon.get('seconds') or 0) / 60 +
                    sum(timing.values()) / 60),
      plots=plots)
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / 'summary.json', summary)
    (workdir / 'report.md').write_text(report(summary, config))
  return summary


# --------------------------------------------------------------------------------------
# Plots and report
# --------------------------------------------------------------------------------------


def make_plots(workdir: pathlib.Path, evals, bon_rows, train_rows, has_gold: bool,
               kl_target: Optional[float] = None) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(workdir / name, dpi=110)
    plt.close(fig)
    names.append(name)

  # Over-optimisation: rewards against sqrt(KL), PPO checkpoints and best-of-n.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  proxy_ax = ax.twinx() if has_gold else ax
  x_ppo = [e['sqrt_kl'] for e in evals]
  x_bon = [r['sqrt_kl'] for r in bon_rows]
  lines = []
  if has_gold:
    lines += ax.plot(x_ppo, [e['gold'] for e in evals], 'o-', color='C0', label='gold, PPO')
    lines += ax.plot(x_bon, [r['gold'] for r in bon_rows], 's--', color='C0',
                     label='gold, best-of-n')
    ax.set_ylabel('gold reward (VADER compound)', color='C0')
  lines += proxy_ax.plot(x_ppo, [e['proxy'] for e in evals], 'o-', color='C1', label='proxy, PPO')
  lines += proxy_ax.plot(x_bon, [r['proxy'] for r in bon_rows], 's--', color='C1',
                         label='proxy, best-of-n')
  proxy_ax.set_ylabel('proxy reward (reward model, offset removed)', color='C1')
  for r in bon_rows:
    proxy_ax.annotate(f'n={r["n"]}', (r['sqrt_kl'], r['proxy']), fontsize=7,
                      textcoords='offset points', xytext=(3, -9))
  ax.set_xlabel('sqrt(KL(π ‖ π_init)) (nats^½)')
  ax.set_title('Reward vs sqrt(KL): proxy and gold (Gao et al. 2022)')
  ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc='best')
  ax.grid(alpha=0.3)
  save(fig, 'overoptimization.png')

  # KL and entropy over iterations.
  it = [r['step'] for r in train_rows]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ax = axes[0]
  ax.plot(it, [r['train/kl_k1'] for r in train_rows], label='KL k1 per sequence (rollouts)')
  ax.plot(it, [r['train/kl_k3'] for r in train_rows], label='KL k3 per sequence (rollouts)')
  ax.plot([e['iteration'] for e in evals], [e['kl_k1'] for e in evals], 'o',
          label='KL k1, evaluation prompts')
  if kl_target is not None:
    ax.axhline(kl_target, color='k', lw=0.8, ls='--', label='KL target')
  ax.set_xlabel('PPO iteration')
  ax.set_ylabel('KL(π ‖ π_init), nats per sequence')
  ax.grid(alpha=0.3)
  beta_ax = ax.twinx()
  beta_ax.plot(it, [r['train/beta'] for r in train_rows], color='gray', ls=':', label='β')
  beta_ax.set_ylabel('β (KL coefficient)', color='gray')
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = beta_ax.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, fontsize=8)
  ax = axes[1]
  ax.plot(it, [r['train/entropy'] for r in train_rows], label='rollouts')
  ax.plot([e['iteration'] for e in evals], [e['entropy'] for e in evals], 'o',
          label='evaluation prompts')
  ax.set_xlabel('PPO iteration')
  ax.set_ylabel('policy entropy, nats per token')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, 'kl_entropy.png')

  # Rewards over iterations.
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(it, [r['train/proxy'] for r in train_rows], color='C1', label='proxy (rollouts)')
  ax.plot([e['iteration'] for e in evals], [e['proxy'] for e in evals], 'o', color='C1',
          label='proxy (evaluation)')
  if has_gold:
    ax.plot(it, [r['train/gold'] for r in train_rows], color='C0', label='gold (rollouts)')
    ax.plot([e['iteration'] for e in evals], [e['gold'] for e in evals], 'o', color='C0',
            label='gold (evaluation)')
  ax.set_xlabel('PPO iteration')
  ax.set_ylabel('reward')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, 'rewards.png')
  return names


def _f(x, digits=3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return '–'
  return f'{x:.{digits}f}'


def report(s: dict, config: dict) -> str:
  has_gold = s['start'].get('gold') is not None
  rm = s['reward_model']
  h = rm.get('heldout') or {}
  interval = h.get('interval') or (None, None)
  pairs = rm.get('pairs') or {}
  pc = config['ppo']
  rm_minutes = ((rm.get('minutes') or 0) + pairs.get('sampling_seconds', 0) / 60
                if rm.get('trained_here') else None)
  lines = [
      '# RLHF: ' + ('positive continuations (Ziegler et al. 2019)' if s['task'] == 'continuation'
                    else 'hh-rlhf dialogue'), '',
      f'- init policy `{s["init"]}`; preset `{s["preset"]}`; {s["iterations"]} PPO iterations '
      f'({s["advantage"]}) of {s["batch_size"]} rows × up to {s["max_new_tokens"]} tokens; '
      f'KL penalty β0 = {pc["beta"]}, ' +
      (f'adaptive to {pc["kl_target"]} nats (horizon {pc["kl_horizon"]:g})'
       if pc['adaptive_kl'] else 'fixed') +
      f'; {pc["epochs"]} epochs × {pc["minibatches"]} minibatches, lr {pc["policy_lr"]:g} '
      f'(value {pc["value_lr"]:g})',
      f'- prompts: {s["prompts"]["train"]} training, {s["prompts"]["eval"]} fixed evaluation '
      'prompts' + (' (first 4–8 words of sentences of held-out State of the Union documents)'
                   if s['task'] == 'continuation' else ''),
      f'- wall time: {s["wall_minutes"]:.1f} min in all (reward model ' +
      (f'{_f(rm_minutes, 1)} min incl. sampling its pairs' if rm_minutes is not None else
       'trained elsewhere') +
      f', best-of-n {_f((s["best_of_n_seconds"] or 0) / 60, 1)} min, PPO '
      f'{_f(s["timing"]["ppo_seconds"] / 60, 1)} min + '
      f'{_f(s["timing"]["compile_seconds"] / 60, 1)} min for first (compiling) iterations, '
      f'evaluations {_f(s["timing"]["eval_seconds"] / 60, 1)} min); '
      f'{s["seconds_per_iteration"]:.2f} s per iteration, of which sampling a batch alone takes '
      f'{s["seconds_sample_batch"]:.2f} s',
      f'- β at the end: {s["final_beta"]:.4f}', '',
      '## Start and end (evaluation prompts, policy samples at temperature 1)', '',
      '| | proxy | ' + ('gold | ' if has_gold else '') + 'KL (k1, nats/seq) | sqrt KL |',
      '|---|---|' + ('---|' if has_gold else '') + '---|---|']
  for name, e in (('start (init policy)', s['start']), (f'end (iteration {s["iterations"]})',
                                                       s['end'])):
    g = (f' {_f(e["gold"])} [{_f(e["gold_lo"])}, {_f(e["gold_hi"])}] |' if has_gold else '')
    lines.append(f'| {name} | {_f(e["proxy"])} [{_f(e["proxy_lo"])}, {_f(e["proxy_hi"])}] |{g} '
                 f'{_f(e["kl_k1"], 2)} | {_f(e["sqrt_kl"], 2)} |')
  lines += ['', '95 % t-intervals over the evaluation prompts (one sample each, the same '
            'sampling key at every evaluation).', '',
            '## Proxy reward model', '',
            f'- `{rm["workdir"]}`; held-out pairwise accuracy **{_f(h.get("accuracy"))}** '
            f'[{_f(interval[0])}, {_f(interval[1])}] on {h.get("n")} pairs (Wilson 95 %), mean '
            f'margin {_f(h.get("margin"))}; score offset {_f(rm["offset"])}']
  if pairs:
    lines.append(f'- pairs: {pairs["samples"] // pairs["prompts"]} samples of the init policy '
                 f'for each of {pairs["prompts"]} training prompts, paired disjointly, chosen = '
                 f'higher gold; {pairs["near_ties"]} near-ties (|Δgold| < '
                 f'{config["pairs"]["min_gap"]}) skipped -> {pairs["train_pairs"]} train / '
                 f'{pairs["heldout_pairs"]} held-out pairs (split by prompt); sample gold '
                 f'{pairs["sample_gold_mean"]:.3f} ± {pairs["sample_gold_std"]:.3f}')
    one = lambda t: ' '.join(t.split())
    for ex in pairs.get('examples', [])[:2]:
      lines.append(f'  - "{one(ex["prompt"])}" → chosen "{one(ex["chosen"])}" '
                   f'({ex["chosen_gold"]:+.2f}) vs rejected "{one(ex["rejected"])}" '
                   f'({ex["rejected_gold"]:+.2f})')
  lines += ['', '## Over-optimisation: PPO checkpoints and best-of-n against sqrt(KL)', '',
            '![over-optimisation](overoptimization.png)', '',
            '| PPO iteration | KL | sqrt KL | proxy | ' + ('gold | ' if has_gold else '') +
            'entropy | length | eos |',
            '|---|---|---|---|' + ('---|' if has_gold else '') + '---|---|---|']
  for e in s['evals']:
    lines.append(f'| {e["iteration"]} | {_f(e["kl_k1"], 2)} | {_f(e["sqrt_kl"], 2)} | '
                 f'{_f(e["proxy"])} |' + (f' {_f(e["gold"])} |' if has_gold else '') +
                 f' {_f(e["entropy"], 2)} | {_f(e["response_length"], 1)} | '
                 f'{_f(e["fraction_done"], 2)} |')
  lines += ['', 'Best-of-n from the init policy on the same evaluation prompts (the sample of '
            'n with the highest proxy score; KL = log n − (n − 1)/n):', '',
            '| n | KL | sqrt KL | proxy |' + (' gold |' if has_gold else ''),
            '|---|---|---|---|' + ('---|' if has_gold else '')]
  for r in s['best_of_n']:
    lines.append(f'| {r["n"]} | {_f(r["kl"], 2)} | {_f(r["sqrt_kl"], 2)} | {_f(r["proxy"])} |' +
                 (f' {_f(r["gold"])} |' if has_gold else ''))
  lines += ['', '## KL, entropy and rewards over iterations', '',
            '![KL and entropy](kl_entropy.png)', '', '![rewards](rewards.png)', '',
            '## Samples before and after (same prompts, same sampling key, temperature 1)', '',
            '| prompt | init policy | proxy | ' + ('gold | ' if has_gold else '') +
            'final policy | proxy |' + (' gold |' if has_gold else ''),
            '|---|---|---|' + ('---|' if has_gold else '') + '---|---|' +
            ('---|' if has_gold else '')]
  esc = lambda t: t.replace('|', '\\|').replace('\n', ' ')
  for b, a in zip(s['samples']['before'], s['samples']['after']):
    lines.append(f'| {esc(b["prompt"])} | {esc(b["continuation"])} | {b["proxy"]:+.2f} |' +
                 (f' {b["gold"]:+.2f} |' if has_gold else '') +
                 f' {esc(a["continuation"])} | {a["proxy"]:+.2f} |' +
                 (f' {a["gold"]:+.2f} |' if has_gold else ''))
  lines += ['', f'The final policy is a stage: `{s["policy_workdir"]}` '
            f'(`python -m experiments.sample --workdir={s["policy_workdir"]} --prompt="..."`).']
  return '\n'.join(lines) + '\n'


def main(config, workdir):
  common.maybe_initialize_distributed()
  init = config.init
  # The gold scorer first: a missing package is reported before any loading.
  make_gold(config.gold)
  summary = run(config, workdir, init)
  if summary.get('interrupted'):
    return
  common.log('\n' + (pathlib.Path(workdir) / 'report.md').read_text())


if __name__ == '__main__':
  common.run_experiment(main, 'configs/rlhf.py', 'runs/rlhf')
