"""Which pretraining objective gives the better model, at equal tokens seen.

  python -m experiments.compare_objectives --config=configs/compare_objectives.py

Trains every arm (causal, masked 15 %, masked 40 %, prefix, span, hybrid) for every
seed with `experiments.pretrain.train`, each in its own run folder, all with the same
architecture, tokenizer, data order (the seed's) and steps; the equal budget is
computed per arm and asserted before anything trains and again from the finished
runs. Each run is then evaluated the same way (research/evaluation.py,
research/classification.py), and so is the shared random initialisation of each
seed. The study folder ends with study.json, results.json, report.md and two plots
(experiments/compare_objectives_report.py rebuilds the last three from the first two).
Resumable at every level: finished runs are not retrained, evaluated runs (same
evaluation config) not re-evaluated, interrupted runs resume from their checkpoint.
"""
import dataclasses
import hashlib
import itertools
import json
import pathlib
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from experiments import common
from experiments import compare_objectives_report as report_lib
from experiments import pretrain
from research import checkpoint as checkpoint_lib
from research import classification
from research import data as data_lib
from research import evaluation
from research import flops as flops_lib
from research import model as model_lib
from research import objectives as objectives_lib
from research import tokenizer as tokenizer_lib
from research import train_step as train_lib

RANDOM, FLOP_CONVENTION = report_lib.RANDOM, report_lib.FLOP_CONVENTION
ADAPT_SEED_OFFSET = 10_000  # adaptation batches: a data order no pretraining run used


class BudgetError(AssertionError):
  """Arms of one seed that would not see the same tokens: the comparison is void."""


# ----------------------------------------------------------------------------
# Arms and their budget.


def arm_config(config, arm: str, seed: int, tokenizer_path) -> ml_collections.ConfigDict:
  """The pretraining config of one (arm, seed): the shared one plus the arm's objective."""
  if arm not in config.arm_objectives:
    raise common.UserError(f'arm {arm!r}: expected one of {sorted(config.arm_objectives)}')
  pc = config.pretrain.copy_and_resolve_references()
  pc.seed = int(seed)
  pc.objective.update(config.arm_objectives[arm].to_dict())
  pc.tokenizer.path = str(tokenizer_path)
  return pc


def run_budget(arm_cfg, train_rows: data_lib.PackedCorpus) -> dict:
  """What one run trains on, computed from the config and the data pipeline itself:
  model inputs processed, corpus tokens drawn, a digest of the data order, FLOPs."""
  c = arm_cfg.to_dict() if hasattr(arm_cfg, 'to_dict') else arm_cfg
  b, l, steps = c['data']['batch_size'], c['data']['seq_len'], c['train']['steps']
  model_cfg = model_lib.TransformerConfig.from_dict(c['model'])
  ds = data_lib.make_train_dataset(train_rows, b, seed=c['seed'], process_index=0,
                                   process_count=1)
  digest, corpus_tokens = hashlib.sha256(), 0
  for i in range(steps):  # the batches pretrain.train will draw, in its order
    batch = ds[i]
    corpus_tokens += int(np.count_nonzero(batch['segment_ids']))
    digest.update(batch['tokens'].tobytes())
  per_token = flops_lib.train_flops_per_token(model_cfg, l, FLOP_CONVENTION)
  return dict(steps=steps, input_tokens=steps * b * l, corpus_tokens=corpus_tokens,
              data_order=digest.hexdigest()[:16], flops_per_token=per_token,
              flops=steps * b * l * per_token,
              params=flops_lib.param_counts(model_cfg)['total'])


BUDGET_KEYS = ('steps', 'input_tokens', 'corpus_tokens', 'data_order', 'flops', 'params')


def check_equal_budget(budgets: dict[str, dict], keys=BUDGET_KEYS) -> None:
  """Raises BudgetError unless every arm's budget agrees on `keys` (one seed's arms)."""
  arms = list(budgets)
  for arm in arms[1:]:
    for key in keys:
      if key in budgets[arms[0]] and budgets[arm].get(key) != budgets[arms[0]][key]:
        raise BudgetError(f'unequal budget: {key} is {budgets[arm].get(key)} for {arm} and '
                          f'{budgets[arms[0]][key]} for {arms[0]}')


def realised_budget(run_dir: pathlib.Path, summary: dict) -> dict:
  """The budget a finished run actually trained with (from its own files)."""
  c = checkpoint_lib.load_config(run_dir)
  b, l = c['data']['batch_size'], c['data']['seq_len']
  scored = [r['train/loss_tokens'] for r in _metric_rows(run_dir) if 'train/loss_tokens' in r]
  return dict(steps=summary['step'], input_tokens=summary['step'] * b * l,
              flops=summary['step'] * b * l * summary['flops_per_token'],
              params=summary['params']['total'],
              scored_tokens_per_step=float(np.mean(scored)) if scored else None)


# ----------------------------------------------------------------------------
# Evaluation data, built once per study.


@dataclasses.dataclass
class EvalData:
  ids: objectives_lib.SpecialIds
  loss_batches: list  # held-out packed rows (causal loss, cloze)
  pll_tokens: np.ndarray  # held-out single-document passages N×L
  pll_word_starts: np.ndarray
  train_rows: data_lib.PackedCorpus  # adaptation batches come from here
  era: Optional[classification.EraTask]
  era_note: str
  piqa_rows: Optional[list]  # [(tokens, segment_ids, score)] two per example
  piqa_labels: Optional[np.ndarray]
  piqa_note: str
  word_start_fn: Any


def _word_start_fn(tokenizer):
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
  return lambda tokens_L: evaluation.word_starts([pieces[int(t)] for t in tokens_L])


def load_piqa(path, max_examples: int):
  """[(goal, sol1, sol2)], labels; None when the folder is absent."""
  path = pathlib.Path(path)
  examples_file, labels_file = path / 'valid.jsonl', path / 'valid-labels.lst'
  if not (examples_file.is_file() and labels_file.is_file()):
    return None, None
  examples = [json.loads(line) for line in examples_file.read_text().splitlines() if line.strip()]
  labels = [int(x) for x in labels_file.read_text().split()]
  if len(examples) != len(labels):
    raise data_lib.DataError(f'{path}: {len(examples)} examples but {len(labels)} labels')
  if max_examples:
    examples, labels = examples[:max_examples], labels[:max_examples]
  return [(e['goal'], e['sol1'], e['sol2']) for e in examples], np.asarray(labels, np.int32)


def build_eval_data(config, tokenizer, train_docs, val_docs, train_tokens, val_tokens,
                    train_rows, val_rows) -> EvalData:
  pc, ec, rc = config.pretrain, config.eval, config.era
  seq_len, batch = pc.data.seq_len, pc.data.batch_size
  word_start_fn = _word_start_fn(tokenizer)
  loss_batches = list(itertools.islice(data_lib.eval_batches(val_rows, batch, 0, 1),
                                       ec.loss_batches))
  pll_tokens, _, _ = classification.balanced_passages(
      val_tokens, [0] * len(val_tokens), 1, seq_len, ec.pll_passages, seed=0)
  pll_starts = np.stack([word_start_fn(t) for t in pll_tokens])

  era, era_note = None, ''
  years = [d.meta.get('year') for d in list(train_docs) + list(val_docs)]
  if all(isinstance(y, int) for y in years):
    try:
      era = classification.make_era_task(
          train_tokens, [d.meta['year'] for d in train_docs], val_tokens,
          [d.meta['year'] for d in val_docs], num_bins=rc.num_bins, length=rc.passage_len,
          train_per_class=rc.train_per_class, test_per_class=rc.test_per_class, seed=0)
      names = era.class_names(min(years), max(years))
      era_note = (f'{era.num_classes} era bins {", ".join(names)} (year quantiles over '
                  f'speeches); {len(era.train_labels)} train passages from '
                  f'{len(set(era.train_speech))} pretraining-train speeches, '
                  f'{len(era.test_labels)} test passages from {len(set(era.test_speech))} '
                  f'held-out speeches, {rc.passage_len} tokens each')
    except ValueError as e:
      era_note = f'era task skipped: {e}'
  else:
    era_note = 'era task skipped: the corpus has no year metadata'

  piqa_rows = piqa_labels = None
  examples, labels = load_piqa(config.piqa.path, config.piqa.max_examples)
  if examples is None:
    piqa_note = f'PIQA skipped: {config.piqa.path} is absent'
  else:
    piqa_rows = []
    for goal, sol1, sol2 in examples:
      context = tokenizer.encode_text(goal)
      for sol in (sol1, sol2):
        piqa_rows.append(evaluation.choice_rows(context, tokenizer.encode_text(' ' + sol),
                                                config.piqa.max_len))
    piqa_labels = labels
    piqa_note = (f'PIQA validation, first {len(labels)} of its examples, goal + solution '
                 f'cut to {config.piqa.max_len} tokens')
  return EvalData(ids=objectives_lib.SpecialIds.from_tokenizer(tokenizer),
                  loss_batches=loss_batches, pll_tokens=pll_tokens, pll_word_starts=pll_starts,
                  train_rows=train_rows, era=era, era_note=era_note, piqa_rows=piqa_rows,
                  piqa_labels=piqa_labels, piqa_note=piqa_note, word_start_fn=word_start_fn)


def evaluate_params(params, model_cfg, objective: Optional[objectives_lib.Objective], seed: int,
                    config, ev: EvalData) -> dict:
  """Every evaluation of one model (objective None: the random initialisation, read in
  place and bidirectionally). Readout and native attention come from the objective's
  record (research/objectives.py)."""
  ec, rc = config.eval, config.era
  readout = 'inplace' if objective is None else objective.readout
  native = 'bidirectional' if objective is None else objective.attention
  # One placement for every model (a loaded checkpoint's), so the jitted evaluations
  # compile once for all runs instead of once per placement.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = jax.device_put(params, device)
  m = dict(causal_loss=evaluation.causal_loss(params, model_cfg, ev.loss_batches))
  po = config.pretrain.optimizer
  opt = train_lib.OptimizerConfig(
      learning_rate=ec.adapt_learning_rate, warmup_steps=max(1, ec.adapt_steps // 10),
      total_steps=ec.adapt_steps, final_lr_fraction=po.final_lr_fraction, b1=po.b1, b2=po.b2,
      weight_decay=po.weight_decay, grad_clip=po.grad_clip)
  ds = data_lib.make_train_dataset(ev.train_rows, config.pretrain.data.batch_size,
                                   seed=ADAPT_SEED_OFFSET + seed, process_index=0,
                                   process_count=1)
  adapted = evaluation.adapt_causal(params, model_cfg, [ds[i] for i in range(ec.adapt_steps)],
                                    opt)
  m['causal_loss_adapted'] = evaluation.causal_loss(adapted, model_cfg, ev.loss_batches)
  del adapted
  m['cloze_accuracy'] = evaluation.cloze_accuracy(
      params, model_cfg, ev.loss_batches, ev.ids, mask_rate=ec.cloze_mask_rate,
      readout=readout, seed=0)  # seed 0: the same masked tokens for every run
  m['pll_word_l2r'] = evaluation.pseudo_log_likelihood(
      params, model_cfg, ev.pll_tokens, ev.pll_word_starts, ev.ids.mask, readout=readout,
      batch_size=ec.batch_size)
  if ev.era is not None:
    kw = dict(steps=rc.steps, batch_size=rc.batch_size, seed=seed,
              attention=native if rc.attention == 'native' else rc.attention)
    m['era_finetune_accuracy'] = classification.finetune(
        params, model_cfg, ev.era, learning_rate=rc.finetune_learning_rate, **kw)
    m['era_probe_accuracy'] = classification.linear_probe(
        params, model_cfg, ev.era, learning_rate=rc.probe_learning_rate, **kw)
    m['era_majority_accuracy'] = classification.majority_accuracy(ev.era.train_labels,
                                                                  ev.era.test_labels)
  if ev.piqa_rows is not None:
    n = len(ev.piqa_labels)
    scores = evaluation.choice_scores(params, model_cfg, ev.piqa_rows, mode='causal',
                                      batch_size=ec.batch_size).reshape(n, 2)
    m['piqa_accuracy'], m['piqa_correct'] = evaluation.choice_accuracy(scores, ev.piqa_labels)
    m['piqa_examples'] = n
    if readout == 'inplace':
      scores = evaluation.choice_scores(
          params, model_cfg, ev.piqa_rows, mode='pll_inplace', mask_id=ev.ids.mask,
          word_start_fn=ev.word_start_fn, batch_size=ec.batch_size).reshape(n, 2)
      m['piqa_pll_accuracy'], m['piqa_pll_correct'] = evaluation.choice_accuracy(
          scores, ev.piqa_labels)
  return m


def eval_fingerprint(config) -> str:
  """Changes when anything that decides an evaluation changes (then runs re-evaluate)."""
  pc = config.pretrain.copy_and_resolve_references()
  keys = dict(eval=config.eval.to_dict(), era=config.era.to_dict(), piqa=config.piqa.to_dict(),
              data=pc.data.to_dict(), model=pc.model.to_dict(), version=1)
  return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# The study.


def _metric_rows(run_dir) -> list[dict]:
  path = pathlib.Path(run_dir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished_summary(run_dir: pathlib.Path, steps: int) -> Optional[dict]:
  path = run_dir / 'summary.json'
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  return summary if summary['step'] >= steps and not summary['interrupted'] else None


def _read_json(path: pathlib.Path) -> Optional[dict]:
  return json.loads(path.read_text()) if path.exists() else None


def train_run(arm_cfg, run_dir: pathlib.Path) -> tuple[dict, float, bool]:
  """(summary, train seconds, trained now?) — a finished run is only read back."""
  steps = arm_cfg.train.steps
  saved = checkpoint_lib.load_config(run_dir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, arm_cfg.to_dict(), run_dir,
                                    keys=('model', 'tokenizer', 'objective', 'data'))
    if saved['seed'] != arm_cfg.seed:
      raise checkpoint_lib.CheckpointError(f'{run_dir} holds seed {saved["seed"]}, not '
                                           f'{arm_cfg.seed}')
  timing_path = run_dir / 'timing.json'
  timing = _read_json(timing_path) or dict(train_seconds=0.0)
  summary = _finished_summary(run_dir, steps)
  if summary is not None:
    return summary, timing['train_seconds'], False
  start = time.time()
  summary = pretrain.train(arm_cfg, run_dir)
  timing['train_seconds'] += time.time() - start  # summed over resumptions
  checkpoint_lib.write_json_atomic(timing_path, timing)
  if summary['interrupted']:
    raise common.UserError(f'{run_dir}: training stopped early (signal or time limit); '
                           f'rerun the same command to resume')
  return summary, timing['train_seconds'], True


def prepare_study(config, workdir: pathlib.Path):
  """Corpus split (fixed across seeds), the shared tokenizer, packed rows."""
  pc = config.pretrain
  docs = data_lib.load_corpus(pc.data.corpus, text_field=pc.data.text_field)
  train_docs, val_docs = data_lib.split_documents(docs, pc.data.validation_fraction,
                                                  seed=pc.data.split_seed)
  if not val_docs:  # the study compares held-out losses: none would be a fake 0.0
    raise common.UserError(f'pretrain.data.validation_fraction={pc.data.validation_fraction}'
                           f' holds out none of {len(docs)} documents: the study needs a '
                           'validation split')
  tok_path = workdir / checkpoint_lib.TOKENIZER_FILE
  try:
    tokenizer, trained = tokenizer_lib.load_or_train(
        (tok_path,), lambda: (d.text for d in train_docs), pc.tokenizer.vocab_size,
        seed=pc.data.split_seed)
  except tokenizer_lib.TextError as e:  # not the vocabulary's fault
    raise common.UserError(str(e)) from None
  except ValueError as e:
    raise common.UserError(f'pretrain.tokenizer.vocab_size: {e}') from None
  if trained:
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tok_path)
  train_tokens = tokenizer.encode_text_batch([d.text for d in train_docs])
  val_tokens = tokenizer.encode_text_batch([d.text for d in val_docs])
  train_rows = data_lib.pack_token_lists(train_tokens, pc.data.seq_len, tokenizer.eos_id)
  val_rows = data_lib.pack_token_lists(val_tokens, pc.data.seq_len, tokenizer.eos_id)
  return tokenizer, tok_path, train_docs, val_docs, train_tokens, val_tokens, train_rows, val_rows


def run_study(config, workdir) -> dict:
  """Trains, evaluates and reports every (arm, seed); returns the results dict."""
  workdir = pathlib.Path(workdir)
  if not config.arms or not config.seeds:
    raise common.UserError('config.arms and config.seeds must not be empty')
  for arm in config.arms:  # before anything is written
    arm_config(config, arm, 0, '')
  (tokenizer, tok_path, train_docs, val_docs, train_tokens, val_tokens, train_rows,
   val_rows) = prepare_study(config, workdir)
  model_cfg = model_lib.TransformerConfig.from_dict(
      config.pretrain.copy_and_resolve_references().model.to_dict())

  # Equal budget, asserted before any training: every arm of a seed must draw the
  # same batches in the same order and process as many tokens with as many FLOPs.
  planned = {}
  for seed in config.seeds:
    planned[seed] = {arm: run_budget(arm_config(config, arm, seed, tok_path), train_rows)
                     for arm in config.arms}
    check_equal_budget(planned[seed])
  common.log(f'budget per run (asserted equal across arms): '
             f'{json.dumps(next(iter(planned[config.seeds[0]].values())))}')

  ev = build_eval_data(config, tokenizer, train_docs, val_docs, train_tokens, val_tokens,
                       train_rows, val_rows)
  fingerprint = eval_fingerprint(config)
  for seed in config.seeds:
    for arm in (RANDOM, *config.arms):
      run_dir = workdir / arm / f'seed{seed}'
      eval_path = run_dir / 'evaluation.json'
      done = _read_json(eval_path)
      done = done is not None and done.get('fingerprint') == fingerprint
      if arm == RANDOM:
        if done:
          common.log(f'{arm} seed {seed}: evaluated before, skipped')
          continue
        params = train_lib.init_params(model_cfg, seed, config.pretrain.data.seq_len)
        objective = None
        train_seconds, summary = 0.0, None
        run_dir.mkdir(parents=True, exist_ok=True)
      else:
        cfg = arm_config(config, arm, seed, tok_path)
        common.log(f'\n== {arm} seed {seed}: {cfg.train.steps} steps in {run_dir}')
        # Checks that the run folder holds this arm's model; a finished run is only read.
        summary, train_seconds, trained = train_run(cfg, run_dir)
        if done and not trained:
          common.log(f'{arm} seed {seed}: trained and evaluated before, skipped')
          continue
        if not trained:
          common.log(f'{arm} seed {seed}: trained before, not retrained')
        params, _, _ = checkpoint_lib.load_stage(run_dir)
        objective = objectives_lib.get(cfg.objective.name)
      start = time.time()
      metrics = evaluate_params(params, model_cfg, objective, seed, config, ev)
      if summary is not None:
        metrics['objective_loss'] = summary['validation']['objective_loss']
      record = dict(arm=arm, seed=seed, fingerprint=fingerprint, metrics=metrics,
                    train_seconds=train_seconds, eval_seconds=time.time() - start,
                    budget=planned[seed][arm] if arm != RANDOM else None)
      checkpoint_lib.write_json_atomic(eval_path, record)
      common.log(f'{arm} seed {seed}: evaluated in {record["eval_seconds"]:.0f}s '
                 f'(trained {train_seconds:.0f}s): '
                 + ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()))
    results = collect_results(config, workdir)
    report_lib.save_inputs(workdir, config, results, dict(
        train_tokens=ev.train_rows.num_tokens, era_note=ev.era_note, piqa_note=ev.piqa_note))
    report_lib.write(workdir)
  return results


# ----------------------------------------------------------------------------
# Results and report.


def collect_results(config, workdir: pathlib.Path) -> dict:
  """Per arm: per-seed metrics, timings, realised budgets, validation curves."""
  out = {}
  for arm in (*config.arms, RANDOM):
    runs = []
    for seed in config.seeds:
      run_dir = workdir / arm / f'seed{seed}'
      record = _read_json(run_dir / 'evaluation.json')
      if record is None:
        continue
      if arm != RANDOM:
        summary = _read_json(run_dir / 'summary.json')
        record['realised'] = realised_budget(run_dir, summary)
        record['curve'] = [(r['step'], r['eval/causal_loss'], r['eval/objective_loss'])
                           for r in _metric_rows(run_dir) if 'eval/causal_loss' in r]
      runs.append(record)
    if runs:
      out[arm] = runs
  # The budget check again, from what the finished runs actually did.
  for seed in config.seeds:
    realised = {arm: r['realised'] for arm, runs in out.items() if arm != RANDOM
                for r in runs if r['seed'] == seed}
    check_equal_budget(realised, keys=('steps', 'input_tokens', 'flops', 'params'))
  return out


def main(config, workdir):
  workdir = pathlib.Path(workdir)
  # Arms of one seed compile the same train step: a persistent compilation cache
  # turns every compile after the first into a cache read.
  jax.config.update('jax_compilation_cache_dir', str(workdir.absolute() / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  start = time.time()
  run_study(config, workdir)
  common.log(f'\nstudy done in {time.time() - start:.0f}s: {workdir / "report.md"}')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/compare_objectives.py', 'runs/compare_objectives')
