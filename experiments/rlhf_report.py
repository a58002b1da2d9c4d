"""The RLHF report, rebuilt from a run's files: summary.json, config.json, metrics.jsonl.

  python -m experiments.rlhf_report --workdir=runs/rlhf

Writes report.md (tables: start and end, the proxy reward model, PPO evaluations,
best-of-n, samples before and after) and the plots (over-optimisation after Gao et al.
2022, KL and entropy, rewards) next to them, without rerunning anything.
"""
import json
import math
import pathlib
import sys

from experiments import common
from research import checkpoint as checkpoint_lib

METRICS_FILE = 'metrics.jsonl'


def make_plots(workdir: pathlib.Path, summary: dict, config: dict, train_rows: list) -> list[str]:
  """overoptimization.png, kl_entropy.png and rewards.png in `workdir` from a run's
  summary (evaluations, best-of-n) and its `train/` metric rows; -> the file names."""
  evals, bon_rows = summary['evals'], summary['best_of_n']
  has_gold = summary['start'].get('gold') is not None
  pc = config['ppo']
  kl_target = pc['kl_target'] if pc['adaptive_kl'] else None
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
  """report.md of a finished run, from its summary and config."""
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


def write(workdir) -> str:
  """Rebuilds report.md and the plots of a finished RLHF workdir; returns the report."""
  workdir = pathlib.Path(workdir)
  summary_path = workdir / 'summary.json'
  if not summary_path.exists():
    raise FileNotFoundError(f'{summary_path}: no summary (is the run finished?)')
  summary = json.loads(summary_path.read_text())
  config = checkpoint_lib.load_config(workdir)
  rows = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()
          if line.strip()]
  make_plots(workdir, summary, config, [r for r in rows if 'train/kl_k1' in r])
  text = report(summary, config)
  (workdir / 'report.md').write_text(text)
  return text


def main(argv) -> int:
  return common.report_cli(argv, 'rlhf_report', write)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
