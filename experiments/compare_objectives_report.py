"""The objective study's report, rebuilt from its run files.

  python -m experiments.compare_objectives_report --workdir=runs/compare_objectives

Reads `study.json` (the study's config and corpus facts) and `results.json` (per arm
and seed: metrics, realised budgets, validation curves), both written by
experiments.compare_objectives, and writes report.md (tables with intervals over
seeds, paired differences, verdicts) and loss_vs_flops.png / downstream.png, without
training or evaluating anything.
"""
import json
import pathlib
import sys
from typing import Optional

import ml_collections
import numpy as np
import scipy.stats

from experiments import common
from research import checkpoint as checkpoint_lib
from research import evaluation
from research import flops as flops_lib
from research import model as model_lib
from research import objectives as objectives_lib

STUDY_FILE = 'study.json'
RESULTS_FILE = 'results.json'
RANDOM = 'random_init'  # each seed's shared initialisation, evaluated like an arm
FLOP_CONVENTION = '6N+attn'
METRICS = (
    ('causal_loss', 'held-out next-token loss, causal attention, as trained (nats) ↓'),
    ('causal_loss_adapted', 'held-out next-token loss after the causal adaptation (nats) ↓'),
    ('cloze_accuracy', 'cloze accuracy, 15 % masked, bidirectional ↑'),
    ('pll_word_l2r', 'PLL-word-l2r per token (nats) ↑'),
    ('era_finetune_accuracy', 'era of a passage: full fine-tuning accuracy ↑'),
    ('era_probe_accuracy', 'era of a passage: linear-probe accuracy ↑'),
    ('era_majority_accuracy', 'era of a passage: majority class (balanced bins: chance)'),
    ('piqa_accuracy', 'PIQA zero-shot accuracy, causal log-likelihood ↑'),
    ('piqa_pll_accuracy', 'PIQA zero-shot accuracy, PLL-word-l2r (masked arms) ↑'),
    ('objective_loss', "final validation loss under the arm's own objective (not comparable)"),
)


def save_inputs(workdir, config, results: dict, facts: dict) -> None:
  """study.json (config + facts) and results.json: everything `write` reads."""
  workdir = pathlib.Path(workdir)
  checkpoint_lib.write_json_atomic(workdir / STUDY_FILE,
                                   dict(config=config.to_dict(), facts=facts))
  checkpoint_lib.write_json_atomic(workdir / RESULTS_FILE, results)


def write(workdir) -> str:
  """Rebuilds report.md and the plots from study.json and results.json; -> the report."""
  workdir = pathlib.Path(workdir)
  for name in (STUDY_FILE, RESULTS_FILE):
    if not (workdir / name).exists():
      raise FileNotFoundError(f'{workdir / name}: missing (run experiments.compare_objectives)')
  study = json.loads((workdir / STUDY_FILE).read_text())
  results = json.loads((workdir / RESULTS_FILE).read_text())
  write_report(ml_collections.ConfigDict(study['config']), workdir, results, study['facts'])
  return (workdir / 'report.md').read_text()



def _values(results, arm, metric) -> list:
  return [r['metrics'][metric] for r in results.get(arm, []) if metric in r['metrics']]


def _by_seed(results, arm, metric) -> dict:
  return {r['seed']: r['metrics'][metric] for r in results.get(arm, [])
          if metric in r['metrics']}


def _cell(values) -> str:
  s = evaluation.summarize(values)
  if s['n'] == 0:
    return '—'
  if s['n'] == 1:
    return f'{s["mean"]:.3f} (1 seed)'
  return f'{s["mean"]:.3f} ± {s["std"]:.3f} [{s["lo"]:.3f}, {s["hi"]:.3f}]'


def results_table(results: dict, columns: list[str]) -> str:
  header = '| metric | ' + ' | '.join(columns) + ' |'
  lines = [header, '|' + '---|' * (len(columns) + 1)]
  for metric, name in METRICS:
    if not any(_values(results, a, metric) for a in columns):
      continue
    lines.append(f'| {name} | ' + ' | '.join(_cell(_values(results, a, metric))
                                             for a in columns) + ' |')
  return '\n'.join(lines)


def _paired(results, a, b, metric) -> Optional[dict]:
  x, y = _by_seed(results, a, metric), _by_seed(results, b, metric)
  seeds = sorted(set(x) & set(y))
  if len(seeds) < 2:
    return None
  return evaluation.paired_difference([x[s] for s in seeds], [y[s] for s in seeds])


def _diff_text(d) -> str:
  return f'{d["mean"]:+.3f} [{d["lo"]:+.3f}, {d["hi"]:+.3f}]'


def _sign(d) -> int:
  """+1 / -1 when the paired interval excludes 0, else 0."""
  return 1 if d['lo'] > 0 else -1 if d['hi'] < 0 else 0


BASELINE = 'causal'  # the arm (by arm name) every other arm is paired with


def _reads_in_place(config, arm: str) -> bool:
  """A masked-LM arm: its objective's record reads predictions in place."""
  return objectives_lib.get(config.arm_objectives[arm].name).readout == 'inplace'


NOT_ENOUGH = 'Not judged: needs the arms compared here with at least 2 finished seeds each.'


def findings(results: dict, config) -> list[str]:
  """Figure by figure: does this run agree with the published findings?"""
  out = []
  arms = [a for a in config.arms if a in results]
  others = [a for a in arms if a != BASELINE]
  # Figure 1: generation, before and after the causal adaptation.
  text = ['**Figure 1 (loss_vs_flops.png) and the loss rows: causal-LM best for generation '
          'without adaptation; MLM→CLM adaptation closes most of the gap (Wang et al. 2022).**']
  diffs = {a: _paired(results, a, BASELINE, 'causal_loss') for a in others}
  diffs = {a: d for a, d in diffs.items() if d is not None}
  if BASELINE in results and diffs:
    worse = [a for a, d in diffs.items() if _sign(d) > 0]
    better = [a for a, d in diffs.items() if _sign(d) < 0]
    verdict = ('agrees' if len(worse) == len(diffs) else
               'disagrees' if better else 'partly agrees')
    text.append(f'Held-out causal loss minus the causal arm\'s (paired over seeds, 95 % '
                f'interval): ' + '; '.join(f'{a} {_diff_text(d)}' for a, d in diffs.items())
                + f'. The causal arm is best without adaptation: {verdict}'
                + (f' (not clearly worse: {", ".join(a for a in diffs if a not in worse)})'
                   if verdict == 'partly agrees' else '')
                + (f' ({", ".join(better)} lower)' if better else '') + '.')
    closed = []
    for a in others:
      before = _paired(results, a, BASELINE, 'causal_loss')
      after = _paired(results, a, BASELINE, 'causal_loss_adapted')
      if before is None or after is None or before['mean'] <= 0:
        continue
      closed.append((a, 1 - after['mean'] / before['mean'], after))
    if closed:
      masked = [c for c in closed if _reads_in_place(config, c[0])]
      verdict = ('agrees' if masked and all(f >= 0.5 for _, f, _ in masked) else
                 'disagrees' if masked else 'no masked arm to judge')
      text.append('After the equal causal adaptation the gap closes by '
                  + '; '.join(f'{a} {100 * f:.0f} % (remaining {_diff_text(d)})'
                              for a, f, d in closed)
                  + f'. Most of the MLM→CLM gap closed: {verdict}.')
  else:
    text.append(NOT_ENOUGH)
  out.append(' '.join(text))

  # Figure 2: downstream classification.
  text = ['**Figure 2 (downstream.png) and the era rows: masked pretraining better for '
          'fine-tuned classification (Gisserot-Boukhlef et al. 2025).**']
  masked_arms = [a for a in arms if _reads_in_place(config, a)]
  judged = False
  if BASELINE in results:
    for metric, label in (('era_finetune_accuracy', 'fine-tuning'),
                          ('era_probe_accuracy', 'linear probe')):
      diffs = {a: _paired(results, a, BASELINE, metric) for a in masked_arms}
      diffs = {a: d for a, d in diffs.items() if d is not None}
      if not diffs:
        continue
      judged = True
      best = max(diffs, key=lambda a: diffs[a]['mean'])
      verdict = {1: 'agrees', -1: 'disagrees', 0: 'inconclusive (interval includes 0)'}[
          _sign(diffs[best])]
      worse = [a for a, d in diffs.items() if a != best and _sign(d) < 0]
      text.append(f'{label.capitalize()} accuracy, masked minus causal: '
                  + '; '.join(f'{a} {_diff_text(d)}' for a, d in diffs.items())
                  + f' — best masked arm ({best}): {verdict}'
                  + (f'; {", ".join(worse)} clearly below causal' if worse else '') + '.')
    rand = _values(results, RANDOM, 'era_finetune_accuracy')
    major = _values(results, RANDOM, 'era_majority_accuracy')
    if rand:
      text.append(f'Reference: random initialisation fine-tuned with the same budget '
                  f'{np.mean(rand):.3f}, majority class {np.mean(major):.3f}.')
  if not judged:
    text.append(NOT_ENOUGH)
  out.append(' '.join(text))

  # Wettig et al.: 40 % vs 15 % masking.
  text = ['**Figure 2 and the cloze/PLL rows: 40 % masking vs 15 % (Wettig et al. 2023: '
          '40 % does at least as well downstream as 15 %).**']
  judged = False
  if 'masked15' in results and 'masked40' in results:
    for metric, label in (('era_finetune_accuracy', 'fine-tuning accuracy'),
                          ('era_probe_accuracy', 'probe accuracy'),
                          ('cloze_accuracy', 'cloze accuracy at 15 %'),
                          ('pll_word_l2r', 'PLL')):
      d = _paired(results, 'masked40', 'masked15', metric)
      if d is not None:
        judged = True
        verdict = {1: '40 % better', -1: '15 % better', 0: 'no clear difference'}[_sign(d)]
        text.append(f'{label}: 40 % minus 15 % {_diff_text(d)} ({verdict}).')
    d = _paired(results, 'masked40', 'masked15', 'era_finetune_accuracy')
    if d is not None:
      text.append('On the downstream task this run '
                  + {1: 'agrees', 0: 'is consistent with "at least as well" but cannot '
                     'separate them', -1: 'disagrees'}[_sign(d)] + '.')
  if not judged:
    text.append(NOT_ENOUGH)
  out.append(' '.join(text))
  return out


def plot_loss_vs_flops(results: dict, config, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arm in config.arms:
    runs = results.get(arm, [])
    if not runs:
      continue
    flops_per_step = runs[0]['budget']['flops'] / runs[0]['budget']['steps']
    for k, ax in ((1, axes[0]), (2, axes[1])):
      by_step = {}
      for r in runs:
        for row in r['curve']:
          by_step.setdefault(row[0], []).append(row[k])
      steps = sorted(by_step)
      mean = np.array([np.mean(by_step[s]) for s in steps])
      std = np.array([np.std(by_step[s]) for s in steps])
      x = np.array(steps) * flops_per_step
      ax.plot(x, mean, marker='o', label=arm)
      ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  axes[0].set_title('held-out next-token loss, causal attention')
  axes[1].set_title("held-out loss under the arm's own objective")
  for ax in axes:
    ax.set_xlabel(f'pretraining FLOPs ({FLOP_CONVENTION})')
    ax.set_ylabel('nats / scored token')
    ax.set_xscale('log')
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_downstream(results: dict, config, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  columns = [a for a in (*config.arms, RANDOM) if a in results]
  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.38
  for i, (metric, label) in enumerate((('era_finetune_accuracy', 'full fine-tuning'),
                                       ('era_probe_accuracy', 'linear probe'))):
    stats = [evaluation.summarize(_values(results, a, metric)) for a in columns]
    means = [s['mean'] for s in stats]
    errs = [(s['hi'] - s['mean']) if s['n'] > 1 else 0 for s in stats]
    ax.bar(np.arange(len(columns)) + (i - 0.5) * width, means, width, yerr=errs, capsize=3,
           label=label)
  major = _values(results, RANDOM, 'era_majority_accuracy')
  if major:
    ax.axhline(np.mean(major), color='k', ls='--', lw=1, label='majority class')
  ax.set_xticks(np.arange(len(columns)), columns)
  ax.set_ylabel('era accuracy (test, held-out speeches)')
  ax.set_title('downstream: era of a State of the Union passage (mean, 95 % interval)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(config, workdir: pathlib.Path, results: dict, facts: dict) -> None:
  """report.md, results.json and the two plots of a study in `workdir`."""
  columns = [a for a in (*config.arms, RANDOM) if a in results]
  plot_loss_vs_flops(results, config, workdir / 'loss_vs_flops.png')
  plot_downstream(results, config, workdir / 'downstream.png')
  pc = config.pretrain
  trained = [r for a in config.arms for r in results.get(a, [])]
  budget = trained[0]['budget'] if trained else None
  model_cfg = model_lib.TransformerConfig.from_dict(pc.copy_and_resolve_references().model
                                                    .to_dict())
  counts = flops_lib.param_counts(model_cfg)
  n_seeds = {a: len(results.get(a, [])) for a in columns}
  lines = [
      '# Pretraining objectives at equal tokens seen', '',
      f'Command: `python -m experiments.compare_objectives '
      f'--config=configs/compare_objectives.py:{config.preset} --workdir={workdir}`.', '',
      f'Model: {pc.model.num_layers} layers, d {pc.model.d_model}, {pc.model.num_heads} heads, '
      f'vocab {pc.tokenizer.vocab_size}, T {pc.data.seq_len}: {counts["total"] / 1e6:.3f}M '
      f'params ({counts["non_embedding"] / 1e6:.3f}M non-embedding). Corpus '
      f'`{pc.data.corpus}`, {facts["train_tokens"] / 1e6:.2f}M train '
      f'tokens; held-out split fixed across seeds (split_seed {pc.data.split_seed}, '
      f'{pc.data.validation_fraction:.0%} of documents).',
  ]
  if budget:
    lines.append(
        f'\nBudget per run, **asserted identical for every arm of a seed** (same batches in '
        f'the same order, checked by digest, and again from the finished runs): '
        f'{budget["steps"]} steps × {pc.data.batch_size} × {pc.data.seq_len} = '
        f'{budget["input_tokens"]:,} tokens seen ({budget["corpus_tokens"]:,} corpus tokens), '
        f'{budget["flops"]:.3g} pretraining FLOPs ({FLOP_CONVENTION}, '
        f'{budget["flops_per_token"] / 1e6:.2f} MFLOP/token). Then every model, the random '
        f'initialisation included, gets {config.eval.adapt_steps} causal adaptation steps '
        f'({config.eval.adapt_steps * pc.data.batch_size * pc.data.seq_len:,} tokens, '
        f'{config.eval.adapt_steps * pc.data.batch_size * pc.data.seq_len * budget["flops_per_token"]:.3g}'
        f' FLOPs) and {config.era.steps} fine-tuning / probe steps of {config.era.batch_size} '
        f'passages.')
    scored = {a: np.mean([r['realised']['scored_tokens_per_step'] for r in results[a]
                          if r['realised']['scored_tokens_per_step']])
              for a in config.arms if a in results}
    lines.append('Tokens scored by the loss per step differ by design: '
                 + ', '.join(f'{a} {v:,.0f}' for a, v in scored.items()) + '.')
  lines += [
      '', f'## Results (mean ± std [95 % t-interval] over seeds; seeds per column: '
      + ', '.join(f'{a} {n}' for a, n in n_seeds.items()) + ')', '',
      results_table(results, columns), '',
      'Readouts: the masked arms predict a masked token in place; every other arm '
      '(causal, prefix, span, hybrid) from the position before it, as each was trained. '
      f'Era features: mean-pooled final hidden states, attention `{config.era.attention}` '
      '(native: causal for the causal arm, bidirectional for the others). '
      f'{facts["era_note"]}. {facts["piqa_note"]}.',
  ]
  piqa = [(a, r['metrics']) for a in columns for r in results.get(a, [])
          if 'piqa_correct' in r['metrics']]
  if piqa:
    pooled = []
    for a in columns:
      rs = [m for b, m in piqa if b == a]
      if rs:
        # Seeds score the same items, so the item-sampling interval uses one seed's n.
        k, n = np.mean([m['piqa_correct'] for m in rs]), rs[0]['piqa_examples']
        lo, hi = evaluation.wilson_interval(int(round(k)), n)
        pooled.append(f'{a} {k / n:.3f} [{lo:.3f}, {hi:.3f}]')
    lines.append(f'PIQA accuracy (seed mean) with its Wilson 95 % interval over the {n} '
                 'items (chance 0.5): ' + '; '.join(pooled) + '.')
  lines += ['', '![validation loss vs FLOPs](loss_vs_flops.png)', '',
            '![downstream accuracy](downstream.png)', '',
            '## Agreement with the published findings', '']
  lines += [f'- {f}' for f in findings(results, config)]
  lines += ['', '## What this scale can and cannot show', '', SCALE_NOTE.format(
      params=counts['total'] / 1e6,
      tokens=(budget['input_tokens'] / 1e6) if budget else float('nan'),
      seeds=len(config.seeds),
      t=float(scipy.stats.t.ppf(0.975, max(len(config.seeds) - 1, 1)))), '', '## Runs', '']
  for a in columns:
    rs = sorted(results[a], key=lambda r: r['seed'])
    lines.append(f'- {a}: ' + '; '.join(
        f'seed {r["seed"]} train {r["train_seconds"]:.0f}s eval {r["eval_seconds"]:.0f}s'
        for r in rs))
  total = sum(r['train_seconds'] + r['eval_seconds'] for a in columns for r in results[a])
  lines.append(f'\nSum over runs: {total / 60:.1f} min (corpus preparation and the first '
               f'compilations come on top).')
  (workdir / 'report.md').write_text('\n'.join(lines) + '\n')


SCALE_NOTE = (
    'Every model here has {params:.2f}M parameters and sees {tokens:.2f}M tokens, with '
    '{seeds} seeds per arm: four to five orders of magnitude below the published studies '
    '(Wang et al. 2022: 5B parameters, 168B tokens; Gisserot-Boukhlef et al. 2025: '
    '210M-1B parameters, up to 100B tokens). It can show effects that are large at any '
    'scale: the loss a model pays when read with an attention pattern or readout it was '
    'not trained with, how far a short causal budget repairs that, and whether the '
    'representations carry more era signal than a random network. It cannot show '
    'effects that appear with capacity and data, such as the higher masking rate paying '
    'off (Wettig et al. found the best rate grows with model size), MLM winning '
    'fine-tuned classification by the margins reported for 210M+ models, or zero-shot '
    'PIQA above chance (the task needs knowledge a model of this size cannot hold; '
    'expect 0.5 within its interval). With {seeds} seeds the t-intervals are wide '
    '(t = {t:.2f}): a difference whose interval includes 0 is "not shown", not "absent".')


_DEFAULT_CONFIG = 'configs/compare_objectives.py'


def main(argv) -> int:
  return common.report_cli(argv, 'compare_objectives_report', write)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
