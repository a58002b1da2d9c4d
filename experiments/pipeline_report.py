"""The pipeline's report card, rebuilt from the stages' files (nothing is rerun).

  python -m experiments.pipeline_report --workdir=runs/pipeline

Reads each stage's config.json, summary/eval JSON and metrics.jsonl under the workdir
and writes report.md, report.json and loss_curves.png: the headline (held-out one- and
two-step word problems with the calculator vs without, 95 % intervals), a table per
stage (data, tokens, steps, wall time, headline metrics with 95 % intervals), the
benchmark table across stages (pretrain vs SFT vs RL, with and without tools, and the
harness tasks), the word-problem accuracy after SFT, the RL start/end and best-of-n (or
DPO's held-out accuracy), the limitation metrics, sample conversations with tool calls,
and the environment.
"""
import json
import math
import pathlib
import platform
import sys

from experiments import common


def _json(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _rows(folder: pathlib.Path) -> list[dict]:
  path = folder / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(x, digits=3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return '–'
  return f'{x:.{digits}f}'


def environment() -> dict:
  """Library versions, devices and machine of the process writing the report."""
  # pylint: disable=g-import-not-at-top
  import flax
  import jax
  import optax
  return dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind, processes=jax.process_count(),
              machine=platform.machine(), processor=platform.processor() or platform.machine())


def collect(workdir) -> dict:
  """The report card as a dict, from the files of a pipeline workdir."""
  workdir = pathlib.Path(workdir)
  times = _json(workdir / 'stage_times.json') or {}
  card = dict(workdir=str(workdir), stages={}, environment=environment())
  pre = _json(workdir / 'pretrain' / 'summary.json')
  if pre:
    cfg = _json(workdir / 'pretrain' / 'config.json')
    dc = cfg['data']
    card['stages']['pretrain'] = dict(
        data=f'{dc["corpus"]} (validation {dc["validation_fraction"]} of documents)',
        steps=pre['step'], tokens=pre['step'] * dc['batch_size'] * dc['seq_len'],
        params=pre['params']['total'], minutes=times.get('pretrain', 0) / 60,
        validation_causal_loss=pre['validation']['causal_loss'],
        unigram_entropy=pre['unigram_entropy'], samples=pre['samples'],
        capped=bool(pre['interrupted']))
  sft = _json(workdir / 'sft' / 'eval.json')
  if sft:
    cfg = _json(workdir / 'sft' / 'config.json')
    dc = cfg['data']
    weights = {k: v for k, v in dc['weights'].items() if v > 0}
    card['stages']['sft'] = dict(
        data=f'{dc["num_train"]} conversations, weights {weights}',
        steps=sft['train']['step'], tokens=sft['train']['step'] * dc['batch_size'] * dc['seq_len'],
        minutes=times.get('sft', 0) / 60,
        heldout_assistant_loss=sft['eval']['heldout_assistant_loss'],
        word_problems_by_k=sft['eval'].get('word_problems_by_k', {}),
        chat=sft['eval'].get('chat', []), capped=bool(sft['train']['interrupted']))
  rl = _json(workdir / 'rlhf' / 'summary.json')
  if rl and rl.get('method') == 'dpo':
    card['stages']['rlhf'] = dict(
        method='dpo', data=f'{rl["data"]["train"]} gold-labelled pairs of the SFT policy\'s '
        f'samples ({rl["prompts"]["train"]} training prompts)', steps=rl['steps'],
        tokens=rl['steps'] * rl['batch_size'] * 2 * rl['seq_len'],
        minutes=times.get('rlhf', 0) / 60, heldout=rl['heldout'],
        heldout_before=rl['heldout_before'], start=rl['gold']['start'], end=rl['gold']['end'],
        loss=rl['loss'], beta=rl['beta'])
  elif rl:
    card['stages']['rlhf'] = dict(
        data=f'{rl["prompts"]["train"]} training prompts ({rl["task"]})',
        steps=rl['iterations'],
        tokens=rl['iterations'] * rl['batch_size'] * rl['max_new_tokens'],
        minutes=times.get('rlhf', 0) / 60, advantage=rl['advantage'],
        reward_model=rl['reward_model'].get('heldout'), start=_pick(rl['start']),
        end=_pick(rl['end']), best_of_n=rl['best_of_n'],
        samples=rl['samples']['after'][:3], plots=[f'rlhf/{p}' for p in rl.get('plots', [])],
        method='ppo' if rl['advantage'] == 'gae' else rl['advantage'])
  if pre:
    card['environment']['mesh'] = {stage: (_json(workdir / stage / 'config.json') or {}).get(
        'mesh', {}).get('shape') for stage in ('pretrain', 'sft')}
  ev = _json(workdir / 'evaluate' / 'evaluation.json')
  if ev:
    card['stages']['evaluate'] = dict(ev, minutes=times.get('evaluate', 0) / 60)
  card['minutes'] = sum(times.values()) / 60
  cpu = _json(workdir / 'stage_cpu_seconds.json') or {}
  card['cpu_minutes'] = {stage: seconds / 60 for stage, seconds in cpu.items()}
  return card


def _pick(e: dict) -> dict:
  keys = ('proxy', 'proxy_lo', 'proxy_hi', 'gold', 'gold_lo', 'gold_hi', 'kl_k1', 'entropy')
  return {k: e.get(k) for k in keys}


def plot_losses(workdir: pathlib.Path) -> str:
  """loss_curves.png: pretraining and SFT training loss by step."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, stage, name in ((axes[0], 'pretrain', 'pretraining (causal LM)'),
                          (axes[1], 'sft', 'SFT (assistant tokens)')):
    rows = [r for r in _rows(workdir / stage) if 'train/loss' in r]
    ax.plot([r['step'] for r in rows], [r['train/loss'] for r in rows], label='train')
    val = [r for r in _rows(workdir / stage) if 'eval/causal_loss' in r]
    if val and stage == 'pretrain':
      ax.plot([r['step'] for r in val], [r['eval/causal_loss'] for r in val], 'o',
              label='validation')
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats/token)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / 'loss_curves.png', dpi=100)
  plt.close(fig)
  return 'loss_curves.png'


MODEL_NAMES = {'pretrain': 'pretrained', 'sft': 'SFT', 'rl': 'RL'}


def _acc(r) -> str:
  if not r:
    return '–'
  lo, hi = r['interval']
  return f'{r["accuracy"]:.2f} [{lo:.2f}, {hi:.2f}]'


def headline_rows(card: dict) -> list[str]:
  """One line per model after SFT: accuracy on the held-out one- and two-step word
  problems with the calculator against without it (95 % Wilson intervals)."""
  ev = card['stages'].get('evaluate')
  if not ev:
    return []
  lines = []
  for model in ('sft', 'rl'):
    wp = ev['word_problems'].get(model)
    if not wp:
      continue
    cells = [f'k={k}: with {_acc(wp["with_tools"][k])} vs without {_acc(wp["without"][k])}'
             for k in wp['with_tools']]
    lines.append(f'{MODEL_NAMES[model]} model, held-out word problems with the calculator vs '
                 f'without ({wp["with_tools_all"]["total"]} problems; exact match, 95 % '
                 'intervals): ' + '; '.join(cells))
  return lines


def headline(card: dict) -> str:
  """The lines printed at the end of the main job."""
  lines = headline_rows(card)
  rl = card['stages'].get('rlhf')
  if rl and rl.get('method') == 'dpo':
    lines.append(f'DPO: held-out implicit-reward accuracy '
                 f'{_f(rl["heldout_before"].get("accuracy"))} -> {_f(rl["heldout"].get("accuracy"))}'
                 f', gold {_f(rl["start"]["gold"])} -> {_f(rl["end"]["gold"])}')
  elif rl:
    lines.append(f'RL ({rl["method"]}): proxy reward {_f(rl["start"]["proxy"])} -> '
                 f'{_f(rl["end"]["proxy"])}, gold {_f(rl["start"]["gold"])} -> '
                 f'{_f(rl["end"]["gold"])}, KL {_f(rl["end"]["kl_k1"], 2)} nats')
  lines.append(f'{len(card["stages"])} stages ({", ".join(card["stages"])}), '
               f'{card["minutes"]:.1f} min of stage time')
  return '\n'.join(lines)


def benchmark_table(ev: dict) -> list[str]:
  """Markdown: one row per (test, tools), one column per model."""
  models = [m for m in MODEL_NAMES if m in ev['word_problems']]
  lines = ['| test | ' + ' | '.join(MODEL_NAMES.get(m, m) for m in models) + ' |',
           '|---|' + '---|' * len(models)]
  first = ev['word_problems'][models[0]]
  for k in first['with_tools']:
    for key, label in (('without', 'no tools'), ('with_tools', 'calculator')):
      lines.append(f'| word problems k={k}, {label} | ' + ' | '.join(
          _acc(ev['word_problems'][m][key].get(k)) for m in models) + ' |')
  lines.append('| calculator calls: valid / all | ' + ' | '.join(
      f'{ev["word_problems"][m]["calls"]["valid"]}/{ev["word_problems"][m]["calls"]["calls"]}'
      for m in models) + ' |')
  harness = ev['harness']
  keys = []
  for m in models:
    keys += [(r['task'], r['metric']) for r in harness[m].get('rows', [])
             if (r['task'], r['metric']) not in keys]
  for task, metric in keys:
    cells = []
    for m in models:
      row = next((r for r in harness[m].get('rows', []) if (r['task'], r['metric']) ==
                  (task, metric)), None)
      cells.append('–' if row is None else f'{_f(row["score"], 2)} [{_f(row["lo"], 2)}, '
                   f'{_f(row["hi"], 2)}] (n {row["n"]}, chance {_f(row["chance"], 2)})')
    lines.append(f'| {task} {metric}, no tools | ' + ' | '.join(cells) + ' |')
  skipped = {harness[m]['skipped'] for m in models if harness[m].get('skipped')}
  for reason in sorted(skipped):
    lines += ['', f'Harness tasks skipped: {reason}.']
  return lines


def conversation_lines(ev: dict) -> list[str]:
  """The held-out conversations with the calculator live, call by call."""
  lines = []
  for model in ('sft', 'rl'):
    for c in ev['word_problems'].get(model, {}).get('conversations', []):
      lines += [f'**{MODEL_NAMES[model]} model** (gold {c["gold"]}; with the calculator '
                f'{"right" if c["with_tools_correct"] else "wrong"}, without '
                f'{"right" if c["without_correct"] else "wrong"})', '',
                f'- user: {c["question"]!r}']
      for m in c['with_tools'][1:]:
        for call in m.get('tool_calls', []):
          args = call.get('arguments') if call.get('name') else call.get('raw')
          lines.append(f'- {m["role"]} calls `{call.get("name")}({json.dumps(args)})`')
        if m['content']:
          lines.append(f'- {m["role"]}: {m["content"]!r}')
      lines += [f'- without tools, the reply: {c["without"]!r}', '']
  return lines


def render(card: dict) -> str:
  """report.md from the card."""
  st = card['stages']
  cpu = card.get('cpu_minutes', {})
  lines = ['# Report card', '', f'Workdir `{card["workdir"]}`; {card["minutes"]:.1f} min of '
           f'stage time in all (wall; CPU time of the process, user + system: '
           + ', '.join(f'{k} {v:.1f}' for k, v in cpu.items()) + ' min).', '']
  lines += [f'**{line}**' for line in headline_rows(card)] + ['']
  lines += ['| stage | data | steps | tokens | minutes | headline |', '|---|---|---|---|---|---|']
  if 'pretrain' in st:
    p = st['pretrain']
    lines.append(f'| pretrain | {p["data"]} | {p["steps"]} | {p["tokens"]:,} | '
                 f'{p["minutes"]:.1f} | validation loss {_f(p["validation_causal_loss"])} nats '
                 f'(unigram entropy {_f(p["unigram_entropy"])}); {p["params"] / 1e6:.1f}M '
                 f'params{" (time cap)" if p["capped"] else ""} |')
  if 'sft' in st:
    s = st['sft']
    loss = ', '.join(f'{k} {_f(v)}' for k, v in s['heldout_assistant_loss'].items())
    lines.append(f'| sft | {s["data"]} | {s["steps"]} | {s["tokens"]:,} | {s["minutes"]:.1f} | '
                 f'held-out assistant loss: {loss}{" (time cap)" if s["capped"] else ""} |')
  if 'rlhf' in st and st['rlhf']['method'] == 'dpo':
    r = st['rlhf']
    lines.append(f'| rl (dpo, {r["loss"]}, β {r["beta"]}) | {r["data"]} | {r["steps"]} | '
                 f'{r["tokens"]:,} | {r["minutes"]:.1f} | held-out implicit-reward accuracy '
                 f'{_f(r["heldout_before"].get("accuracy"))} -> {_f(r["heldout"].get("accuracy"))}'
                 f' on {r["heldout"].get("n")} pairs; gold {_f(r["start"]["gold"])} -> '
                 f'{_f(r["end"]["gold"])} |')
  elif 'rlhf' in st:
    r = st['rlhf']
    h = r['reward_model'] or {}
    lines.append(f'| reward model | pairs of the SFT policy\'s samples, gold-labelled | | | | '
                 f'held-out accuracy {_f(h.get("accuracy"))} on {h.get("n")} pairs |')
    lines.append(f'| rl ({r["advantage"]}) | {r["data"]} | {r["steps"]} | {r["tokens"]:,} | '
                 f'{r["minutes"]:.1f} | proxy {_f(r["start"]["proxy"])} -> '
                 f'{_f(r["end"]["proxy"])}, gold {_f(r["start"]["gold"])} -> '
                 f'{_f(r["end"]["gold"])}, KL {_f(r["end"]["kl_k1"], 2)} |')
  if 'evaluate' in st:
    e = st['evaluate']
    lines.append(f'| evaluate | {e["problems"]["total"]} held-out word problems (k in '
                 f'{e["problems"]["ks"]}), harness tasks, limitations | | | '
                 f'{e["minutes"]:.1f} | see the benchmark table |')
  lines += ['', '![loss curves](loss_curves.png)', '']
  if 'evaluate' in st:
    lines += ['## Benchmarks across stages', '',
              'Held-out word problems: greedy, exact match of the final number, 95 % Wilson '
              'intervals; "no tools": the question alone (a call the model writes is never '
              'answered), "calculator": the question after a system message declaring the '
              'calculator, which runs live (research/tools/runtime.py). Harness tasks: '
              'lm-evaluation-harness on local data (experiments/evaluate.py).', '']
    lines += benchmark_table(st['evaluate']) + ['']
  if 'sft' in st and st['sft']['word_problems_by_k']:
    lines += ['## Word problems after SFT', '',
              'Held-out synthetic problems by number of arithmetic steps k; greedy, exact match '
              'of the final number; 95 % Wilson intervals; "most common answer" is the accuracy '
              'of always giving the most frequent answer (the floor a model ignoring the '
              'question reaches).', '', '| k | accuracy | most common answer |', '|---|---|---|']
    for k, r in st['sft']['word_problems_by_k'].items():
      lo, hi = r['interval']
      lines.append(f'| {k} | {r["accuracy"]:.2f} [{lo:.2f}, {hi:.2f}] ({r["correct"]}/'
                   f'{r["total"]}) | {_f(r.get("majority_answer"), 2)} |')
    lines.append('')
  if 'rlhf' in st and st['rlhf']['method'] != 'dpo':
    r = st['rlhf']
    lines += [f'## RL ({r["method"]})', '', '| | proxy | gold | KL (nats/seq) |',
              '|---|---|---|---|']
    for name in ('start', 'end'):
      e = r[name]
      lines.append(f'| {name} | {_f(e["proxy"])} [{_f(e["proxy_lo"])}, {_f(e["proxy_hi"])}] | '
                   f'{_f(e["gold"])} [{_f(e["gold_lo"])}, {_f(e["gold_hi"])}] | '
                   f'{_f(e["kl_k1"], 2)} |')
    lines += ['', 'Best-of-n from the SFT policy: ' + ', '.join(
        f'n={b["n"]}: proxy {_f(b["proxy"])}, gold {_f(b["gold"])}' for b in r['best_of_n']),
              ''] + [f'![{p}]({p})' for p in r['plots']] + ['']
  if 'evaluate' in st:
    lim = st['evaluate']['limitations']['report'].replace('\n## ', '\n### ')
    lines += ['## Limitations at a small size (experiments/limitations.py)', '',
              lim.replace('# Limitations, measured', '').strip(), '']
    lines += ['## Conversations with the calculator (held-out problems)', '']
    lines += conversation_lines(st['evaluate'])
  lines += ['## Samples', '']
  for s in st.get('pretrain', {}).get('samples', []):
    lines.append(f'- pretrain: {s!r}')
  for turn in st.get('sft', {}).get('chat', []):
    lines += [f'- sft, user: {turn["user"]!r}', f'  assistant: {turn["assistant"]!r}']
  for s in st.get('rlhf', {}).get('samples', []):
    lines.append(f'- rl: {s["prompt"]!r} -> {s["continuation"]!r} (proxy {s["proxy"]:+.2f}'
                 + ('' if s['gold'] is None else f', gold {s["gold"]:+.2f}') + ')')
  env = card['environment']
  lines += ['', '## Environment', '', f'python {env["python"]}, jax {env["jax"]}, flax '
            f'{env["flax"]}, optax {env["optax"]}; {len(env["devices"])} × {env["device_kind"]}, '
            f'{env["processes"]} process(es); {env["processor"]}; mesh (data, fsdp, tensor) '
            f'{env.get("mesh", {})}']
  return '\n'.join(lines) + '\n'


def write(workdir) -> dict:
  """Rebuilds report.md, report.json and loss_curves.png; returns the card."""
  workdir = pathlib.Path(workdir)
  card = collect(workdir)
  card['plots'] = [plot_losses(workdir)]
  (workdir / 'report.json').write_text(json.dumps(card, indent=2, default=str))
  (workdir / 'report.md').write_text(render(card))
  return card


def main(argv) -> int:
  return common.report_cli(argv, 'pipeline_report', lambda workdir: render(write(workdir)))


if __name__ == '__main__':
  sys.exit(main(sys.argv))
