"""The limitations report, rebuilt from a run's limitations.json: report.md and its plots.

  python -m experiments.limitations_report --workdir=runs/limitations

Plots (PNG, next to report.md): hallucination rates by model, bias P(role | group) by
stage, accuracy by steps k per arithmetic format, tokenizer-view accuracy with and
without the python tool.
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import common  # pylint: disable=wrong-import-position
from research import limitations as lim  # pylint: disable=wrong-import-position
from research import limitations_tools as lt  # pylint: disable=wrong-import-position

RESULTS_FILE = 'limitations.json'
BIAS_STAGES = ('pretrain', 'sft', 'search_sft', 'rl')
PART_ORDER = ('hallucination', 'search', 'bias', 'think', 'tokenizer')


def _f(x):
  return '—' if x is None or not np.isfinite(x) else f'{x:.3f}'


def _ci(m, key):
  lo, hi = m[key + '_ci']
  return f'{_f(m[key])} [{_f(lo)}, {_f(hi)}]'


def _hallucination_rows(results):
  rows = []
  h, s = results.get('hallucination'), results.get('search')
  if h:
    rows += [('before mitigation', h['before']), ('"I don\'t know" SFT (mitigation 1)',
                                                  h['after'])]
  if s:
    rows.append(('search tool SFT (mitigation 2)', s))
  return rows


def hallucination_section(results) -> list[str]:
  rows = _hallucination_rows(results)
  if not rows:
    return []
  h, s = results.get('hallucination'), results.get('search')
  lines = ['## Hallucination (synthetic world; 95% Wilson intervals)', '']
  if h:
    lines += [f'people: {h["people"]}; mitigation 1 added {h["idk_examples"]} "I don\'t '
              f'know" examples for the {h["probed_questions"]} probed questions (those '
              'answered wrong).', '']
  if s:
    lines += [f'mitigation 2: {s["conversations"]} search conversations (known people: '
              'the answer read from the result; unknown-probe people: "no results" -> "I '
              'don\'t know"), mixed with the pretraining texts. At test time the model '
              f'called search on {_f(s["known_call_rate"])} of the known and '
              f'{_f(s["unknown_call_rate"])} of the unknown questions (calls that ran: '
              f'{_f(s["call_ok_rate"])}); the options are scored after the tool result.', '',
              f'Example training conversation: `{s["examples"][0]}`', '']
  lines += ['| model | known acc | known IDK | unknown IDK | unknown made-up | '
            'unknown confident made-up | ECE |', '|---|---|---|---|---|---|---|']
  for name, m in rows:
    lines.append(f'| {name} | {_ci(m, "known_accuracy")} | {_ci(m, "known_idk")} '
                 f'| {_ci(m, "unknown_idk")} | {_ci(m, "unknown_made_up")} | '
                 f'{_ci(m, "unknown_confident_made_up")} | {_f(m["ece"])} |')
  m = rows[0][1]
  lines += ['', f'(known = {m["known"]} questions, unknown = {m["unknown"]}; chance on a '
            'known question ≈ 1/9–1/17; "confident" = answer probability ≥ 0.5)',
            '', '![hallucination](hallucination.png)', '']
  return lines


def bias_section(results) -> list[str]:
  b = results.get('bias')
  if not b:
    return []
  lines = ['## Bias amplification (Zhao et al. 2017) after pretraining, SFT and RL', '',
           f'Training text: roles {lim.ROLES} × groups {lim.GROUPS}, counts {b["train_counts"]},'
           f' b*(role, group) {np.round(b["train_bias"], 3).tolist()}. Amplification = mean '
           'over the (role, group) pairs biased in training of b~ - b* (0: the training '
           'rate is reproduced; > 0: exaggerated).', '',
           'SFT = the "I don\'t know" fine-tune (pretraining texts + IDK Q&A); search SFT '
           '= the search-tool fine-tune; RL = GRPO from the SFT model on bias prompts with '
           'training names, reward 1 for a completion that is exactly " <role>." + eos for '
           'any role alike: blind to which role, but one must be named. RL reward by '
           f'iteration: {[round(h["reward"], 2) for h in b["rl_history"]]}; final KL '
           f'{_f(b["rl_history"][-1]["kl"]) if b["rl_history"] else "—"} nats.', '',
           '| stage | decoding | counts (role × group) | valid | P(role0 \\| group) | '
           'amplification |', '|---|---|---|---|---|---|']
  for stage in BIAS_STAGES:
    if stage not in b:
      continue
    for label in ('sampled', 'greedy', 'probability'):
      m = b[stage][label]
      rates = np.round(lt.rate_table(m['counts'])[0], 3).tolist()
      valid = f'{m["valid"]}/{m["total"]}' if 'valid' in m else '—'
      lines.append(f'| {stage} | {label} | {np.round(m["counts"], 1).tolist()} | {valid} | '
                   f'{rates} | {_f(m["amplification"])} |')
  return lines + ['', '![bias](bias.png)', '']


def think_section(results) -> list[str]:
  t = results.get('think')
  if not t:
    return []
  ks = list(t['steps_first']['by_k'])
  tc = results.get('config', {}).get('think', {})
  m = dict(results.get('config', {}).get('model', {}), **tc.get('model', {}))
  size = (f'Each arm: {m["num_layers"]} layers, d={m["d_model"]}, {tc["steps"]} steps from '
          'scratch, same chains; greedy answers to held-out questions.'
          if 'num_layers' in m and 'steps' in tc else '')
  lines = ['## Tokens to think: accuracy by steps k (95% Wilson intervals)', '', size, '',
           '| format | train tokens | ' + ' | '.join(f'k={k}' for k in ks) + ' |',
           '|---|---|' + '---|' * len(ks)]
  for fmt in lim.FORMATS:
    cells = [f'{_f(v["accuracy"])} [{_f(v["ci"][0])}, {_f(v["ci"][1])}]'
             for v in t[fmt]['by_k'].values()]
    lines.append(f'| {fmt} | {t[fmt]["train_tokens"]} | ' + ' | '.join(cells) + ' |')
  return lines + ['', *[f'- {fmt} sample: `{t[fmt]["example"]}`' for fmt in lim.FORMATS], '',
                  '![think](think.png)', '']


def baseline(task: str, r: dict) -> str:
  return '0.500 (chance)' if task == 'compare' else f'{_f(r["majority_baseline"])} (majority)'


def tokenizer_section(results) -> list[str]:
  v = results.get('tokenizer')
  if not v:
    return []
  lines = ['## The tokenizer view: letters and decimals, with and without the python tool', '',
           f'One model trained on {v["train_items"]} items × 2 conversations (asked '
           'directly; asked with "Use python." and answered through a python call), tested '
           f'on {v["test_items"]} items with words and number pairs never seen in training '
           '(greedy; with the tool the python sandbox runs the code the model writes).', '',
           'Token splits (our tokenizer):', '']
  for w, pieces in {**v['splits'], **v['splits_in_question']}.items():
    lines.append(f'- `{w}` → ' + ' · '.join(f'`{p}`' for p in pieces))
  lines += ['', '| task | direct | with python tool | calls (tool prompt) | baseline '
            '| digits-as-integers rule |', '|---|---|---|---|---|---|']
  for task, r in v['by_task'].items():
    d, t = r['direct'], r['tool']
    cell = lambda m: f'{_f(m["accuracy"])} [{_f(m["ci"][0])}, {_f(m["ci"][1])}] (n={m["n"]})'
    lines.append(f'| {task} | {cell(d)} | {cell(t)} | {t["calls"]}/{t["n"]} | '
                 f'{baseline(task, r)} | {_f(r.get("string_rule_baseline"))} |')
  lines += ['', 'Baseline: count, always the commonest training answer; compare, a coin '
            '(one of two numerals). Digits-as-integers rule: the accuracy of reading the '
            'digits after the point as an integer (9.11 > 9.9), the trap a tokenizer that '
            'cuts "11" as one piece invites (ours cuts every digit apart, see the splits '
            'above, so here the tokens do not force it). Counting is copying plus counting '
            'letters the tokenizer mostly keeps as single pieces here (vocabulary 512); '
            'the tool only helps when the model copies the word into the code exactly.', '',
            'Examples:', '']
  for task, r in v['by_task'].items():
    for mode in ('direct', 'tool'):
      for e in r[mode]['examples'][:1]:
        lines.append(f'- {task}/{mode}: {e["question"]} → {e["answer"]!r} (gold {e["gold"]!r};'
                     f' calls {e["calls"]})')
  return lines + ['', '![tokenizer](tokenizer.png)', '']


def timing_section(results) -> list[str]:
  t = results.get('timing', {})
  if not t:
    return []
  lines = ['## Wall time by part', '', '| part | wall (s) | process CPU (s) |', '|---|---|---|']
  for part in PART_ORDER:
    if part in t:
      lines.append(f'| {part} | {t[part]["wall_s"]:.0f} | {t[part]["cpu_s"]:.0f} |')
  lines.append(f'| total | {sum(x["wall_s"] for x in t.values()):.0f} | '
               f'{sum(x["cpu_s"] for x in t.values()):.0f} |')
  return lines + ['', 'bias reuses the models of hallucination and search when those ran '
                  'first (their training counts there).', '']


def report(results: dict) -> str:
  """report.md's text from limitations.json's content."""
  lines = ['# Limitations, measured', '']
  c = results.get('config', {})
  if c:
    done = ','.join(p for p in PART_ORDER if p in results)
    lines += [f'preset `{c.get("preset")}`, seed {c.get("seed")}, parts `{done}`', '']
    missing = [p for p in PART_ORDER if p not in results]
    if missing:
      lines += [f'Not run at this size: {", ".join(missing)}; the whole study at its default '
                'size: `python -m experiments.limitations --workdir=runs/limitations`.', '']
  for section in (hallucination_section, bias_section, think_section, tokenizer_section,
                  timing_section):
    lines += section(results)
  return '\n'.join(lines)


def _err(values, intervals) -> np.ndarray:
  """2×N error-bar lengths of `values` to their [lo, hi] intervals (0 where undefined)."""
  v = np.asarray(values, np.float64)
  ci = np.asarray(intervals, np.float64).reshape(len(v), 2)
  return np.nan_to_num(np.clip(np.stack([v - ci[:, 0], ci[:, 1] - v]), 0, None))


def plots(results: dict, out: pathlib.Path) -> list[str]:
  """Writes the PNGs of the parts in `results` into `out`; returns their file names."""
  written = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    written.append(name)

  rows = _hallucination_rows(results)
  if rows:
    keys = ('known_accuracy', 'unknown_idk', 'unknown_confident_made_up')
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (name, m) in enumerate(rows):
      x = np.arange(len(keys)) + i * 0.8 / len(rows)
      err = _err([m[k] for k in keys], [m[k + '_ci'] for k in keys])
      ax.bar(x, [np.nan_to_num(m[k]) for k in keys], 0.8 / len(rows), yerr=err, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - 0.4 / len(rows), keys)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    save(fig, 'hallucination.png')
  b = results.get('bias')
  if b:
    stages = [s for s in BIAS_STAGES if s in b]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    train = lt.rate_table(b['train_counts'])[0]
    for g, group in enumerate(lim.GROUPS):
      ax.axhline(train[g], ls='--', color=f'C{g}', lw=0.8)
      for j, label in enumerate(('sampled', 'greedy', 'probability')):
        ax.plot(stages, [lt.rate_table(b[s][label]['counts'])[0][g] for s in stages],
                marker='os^'[j], color=f'C{g}', ls='-:.'[j] if j < 2 else '-.',
                label=f'{group}, {label}')
    ax.set_ylabel(f'P({lim.ROLES[0]} | group)')
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    save(fig, 'bias.png')
  t = results.get('think')
  if t:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for fmt in lim.FORMATS:
      ks = [int(k) for k in t[fmt]['by_k']]
      acc = [v['accuracy'] for v in t[fmt]['by_k'].values()]
      err = _err(acc, [v['ci'] for v in t[fmt]['by_k'].values()])
      ax.errorbar(ks, acc, yerr=err, marker='o', capsize=3, label=fmt)
    ax.set_xlabel('steps k')
    ax.set_ylabel('accuracy')
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    save(fig, 'think.png')
  v = results.get('tokenizer')
  if v:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    tasks = list(v['by_task'])
    for j, mode in enumerate(('direct', 'tool')):
      acc = [v['by_task'][k][mode]['accuracy'] for k in tasks]
      err = _err(acc, [v['by_task'][k][mode]['ci'] for k in tasks])
      ax.bar(np.arange(len(tasks)) + 0.4 * j, acc, 0.4, yerr=err, label=mode)
    ax.set_xticks(np.arange(len(tasks)) + 0.2, tasks)
    ax.set_ylim(0, 1.05)
    ax.legend()
    save(fig, 'tokenizer.png')
  return written


def write(workdir) -> str:
  """Rebuilds report.md and the plots of a limitations workdir; returns the text.
  Raises FileNotFoundError when the run has no limitations.json."""
  workdir = pathlib.Path(workdir)
  path = workdir / RESULTS_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: no results (is the run finished?)')
  results = json.loads(path.read_text())
  plots(results, workdir)
  text = report(results)
  (workdir / 'report.md').write_text(text)
  return text


def main(argv) -> int:
  return common.report_cli(argv, 'limitations_report', write)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
