"""The pipeline's report card, rebuilt from the stages' files (nothing is rerun).

  python -m experiments.pipeline_report --workdir=runs/pipeline

Reads each stage's config.json, summary/eval JSON and metrics.jsonl under the workdir
and writes report.md, report.json and loss_curves.png: a table per stage (data, tokens,
steps, wall time, headline metrics with 95 % intervals), the word-problem accuracy
after SFT, the RL start/end and best-of-n, sample conversations, and the environment.
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
  if rl:
    card['stages']['rlhf'] = dict(
        data=f'{rl["prompts"]["train"]} training prompts ({rl["task"]})',
        steps=rl['iterations'],
        tokens=rl['iterations'] * rl['batch_size'] * rl['max_new_tokens'],
        minutes=times.get('rlhf', 0) / 60, advantage=rl['advantage'],
        reward_model=rl['reward_model'].get('heldout'), start=_pick(rl['start']),
        end=_pick(rl['end']), best_of_n=rl['best_of_n'],
        samples=rl['samples']['after'][:3], plots=[f'rlhf/{p}' for p in rl.get('plots', [])])
  card['minutes'] = sum(times.values()) / 60
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


def headline(card: dict) -> str:
  """The lines printed at the end of the main job."""
  lines = []
  sft = card['stages'].get('sft')
  if sft and sft['word_problems_by_k']:
    lines.append('word problems after SFT (greedy exact match, 95 % interval): ' + ', '.join(
        f'k={k} {r["accuracy"]:.2f} [{r["interval"][0]:.2f}, {r["interval"][1]:.2f}]'
        for k, r in sft['word_problems_by_k'].items()))
  rl = card['stages'].get('rlhf')
  if rl:
    lines.append(f'RL: proxy reward {_f(rl["start"]["proxy"])} -> {_f(rl["end"]["proxy"])}, '
                 f'gold {_f(rl["start"]["gold"])} -> {_f(rl["end"]["gold"])}, '
                 f'KL {_f(rl["end"]["kl_k1"], 2)} nats')
  lines.append(f'{len(card["stages"])} stages, {card["minutes"]:.1f} min of stage time')
  return '\n'.join(lines)


def render(card: dict) -> str:
  """report.md from the card."""
  st = card['stages']
  lines = ['# Report card', '', f'Workdir `{card["workdir"]}`; {card["minutes"]:.1f} min of '
           'stage time in all.', '', '| stage | data | steps | tokens | minutes | headline |',
           '|---|---|---|---|---|---|']
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
  if 'rlhf' in st:
    r = st['rlhf']
    h = r['reward_model'] or {}
    lines.append(f'| reward model | pairs of the SFT policy\'s samples, gold-labelled | | | | '
                 f'held-out accuracy {_f(h.get("accuracy"))} on {h.get("n")} pairs |')
    lines.append(f'| rl ({r["advantage"]}) | {r["data"]} | {r["steps"]} | {r["tokens"]:,} | '
                 f'{r["minutes"]:.1f} | proxy {_f(r["start"]["proxy"])} -> '
                 f'{_f(r["end"]["proxy"])}, gold {_f(r["start"]["gold"])} -> '
                 f'{_f(r["end"]["gold"])}, KL {_f(r["end"]["kl_k1"], 2)} |')
  lines += ['', '![loss curves](loss_curves.png)', '']
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
  if 'rlhf' in st:
    r = st['rlhf']
    lines += ['## RL', '', '| | proxy | gold | KL (nats/seq) |', '|---|---|---|---|']
    for name in ('start', 'end'):
      e = r[name]
      lines.append(f'| {name} | {_f(e["proxy"])} [{_f(e["proxy_lo"])}, {_f(e["proxy_hi"])}] | '
                   f'{_f(e["gold"])} [{_f(e["gold_lo"])}, {_f(e["gold_hi"])}] | '
                   f'{_f(e["kl_k1"], 2)} |')
    lines += ['', 'Best-of-n from the SFT policy: ' + ', '.join(
        f'n={b["n"]}: proxy {_f(b["proxy"])}, gold {_f(b["gold"])}' for b in r['best_of_n']),
              ''] + [f'![{p}]({p})' for p in r['plots']] + ['']
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
            f'{env["processes"]} process(es); {env["processor"]}']
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
