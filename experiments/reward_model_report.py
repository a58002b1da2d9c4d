"""The reward-model report, rebuilt from a run's files (summary.json, config.json).

  python -m experiments.reward_model_report --workdir=runs/reward_model
"""
import json
import pathlib
import sys

from experiments import common
from research import checkpoint as checkpoint_lib

SUMMARY_FILE = 'summary.json'
REPORT_FILE = 'report.md'


def report(summary: dict, config: dict) -> str:
  """A short markdown report of a finished (or interrupted) run."""
  def acc(m):
    if not m or m.get('accuracy') is None:
      return 'n/a'
    lo, hi = m['interval']
    return f'{m["accuracy"]:.3f} [{lo:.3f}, {hi:.3f}] ({m["correct"]}/{m["n"]})'
  h, data = summary['heldout'], summary['data']
  oc = config['optimizer']
  lines = [
      '# Reward model', '',
      f'- init: `{summary["init"]}` ({summary["params"]["total"] / 1e6:.2f}M parameters + '
      'a scalar head)',
      f'- data: {data.get("source")} `{data.get("path", "(arrays)")}`: {data["train"]} train / '
      f'{data["heldout"]} held-out pairs (held out by prompt)'
      + (f'; skipped {data["skipped"]}' if data.get('skipped') else '')
      + (f'; {data["truncated"]} pairs cut from the left to {summary["seq_len"]} tokens'
         if data.get('truncated') is not None else ''),
      f'- training: {summary["steps"]} steps × {summary["batch_size"]} pairs '
      f'({summary["steps"] * summary["batch_size"] / max(data["train"], 1):.1f} epochs), '
      f'lr {oc["learning_rate"]:g}, {summary["minutes"]:.1f} min in all'
      + (' (interrupted)' if summary['interrupted'] else ''), '',
      '| held-out pairs | accuracy, 95 % Wilson interval | mean margin | loss |',
      '|---|---|---|---|',
  ]
  for name, m in (('trained', h), ('untrained head', summary.get('heldout_before'))):
    if m and m.get('n'):
      lines.append(f'| {name} | {acc(m)} | {m["margin"]:.3f} | {m["loss"]:.3f} |')
  lw = summary['baselines']['longer_wins']
  lines += ['',
            f'Baselines: chance 0.5; "the longer sequence wins" '
            f'{"n/a" if lw is None else f"{lw:.3f}"} on the same held-out pairs.',
            f'Training pairs ({summary["offset_pairs"]} scored): accuracy '
            f'{acc(summary["train"])}; score offset (mean score) {summary["offset"]:.4f}, '
            f'score std {summary["train"]["score_std"]:.3f}.']
  return '\n'.join(lines) + '\n'


def write(workdir) -> str:
  """Rebuilds report.md of a reward-model workdir from its summary and config."""
  workdir = pathlib.Path(workdir)
  if not (workdir / SUMMARY_FILE).exists():
    raise FileNotFoundError(f'{workdir / SUMMARY_FILE}: no summary (is the run finished?)')
  text = report(json.loads((workdir / SUMMARY_FILE).read_text()),
                checkpoint_lib.load_config(workdir))
  (workdir / REPORT_FILE).write_text(text)
  return text


def main(argv) -> int:
  return common.report_cli(argv, 'reward_model_report', write)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
