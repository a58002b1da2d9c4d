"""The SFT report, rebuilt from a run's files (eval.json, config.json; the answer-format
twin's eval.json in its subfolder when there is one).

  python -m experiments.sft_report --workdir=runs/sft
"""
import json
import pathlib
import sys

from experiments import common
from research import checkpoint as checkpoint_lib
from research.tools import evaluation as tools_eval

EVAL_FILE = 'eval.json'
TWIN_FORMATS = ('steps_first', 'answer_first')


def report(main: dict, twin: dict | None, config: dict) -> str:
  """report.md of an SFT run (and its answer-format twin) from their eval.json."""
  lines = ['# Supervised fine-tuning', '',
           f'- init: `{config["init"]}`; {main["train"]["step"]} steps, batch '
           f'{config["data"]["batch_size"]} × {config["data"]["seq_len"]} tokens; '
           f'{main["minutes"]:.1f} min' + (f' (+ {twin["minutes"]:.1f} min for the twin)'
                                           if twin else ''),
           f'- packing: {main["packing"]}', '',
           '## Held-out loss on assistant tokens (nats/token)', '',
           '| source | ' + main['format'] + (' | ' + twin['format'] if twin else '') + ' |',
           '|---|---|' + ('---|' if twin else '')]
  loss_cell = lambda x: '–' if x is None else f'{x:.3f}'  # None: no held-out conversations
  for source, loss in main['eval']['heldout_assistant_loss'].items():
    extra = f' {loss_cell(twin["eval"]["heldout_assistant_loss"].get(source))} |' \
        if twin else ''
    lines.append(f'| {source} | {loss_cell(loss)} |{extra}')
  if 'word_problems_by_k' in main['eval']:
    lines += ['', '## Synthetic word problems: exact match of the final number (greedy)', '',
              'k = number of arithmetic steps; 95 % Wilson intervals; "most common answer" is '
              'the accuracy of always giving the test set\'s most frequent answer for that k.',
              '',
              '| k | ' + main['format'] + (' | ' + twin['format'] if twin else '') +
              ' | most common answer |',
              '|---|---|' + ('---|' if twin else '') + '---|']
    def cell(r):
      if r['accuracy'] is None:  # no problems with this k
        return f'– (0/{r["total"]})'
      lo, hi = r['interval']
      return f'{r["accuracy"]:.2f} [{lo:.2f}, {hi:.2f}] ({r["correct"]}/{r["total"]})'
    for k, r in main['eval']['word_problems_by_k'].items():
      extra = f' {cell(twin["eval"]["word_problems_by_k"][k])} |' if twin else ''
      lines.append(f'| {k} | {cell(r)} |{extra} {r.get("majority_answer", float("nan")):.2f} |')
  if 'gsm8k' in main['eval']:
    g = main['eval']['gsm8k']
    if g['accuracy'] is None:
      lines += ['', 'GSM8K test: no problems (nothing to score).']
    else:
      lo, hi = g['interval']
      lines += ['', f'GSM8K test, first {g["total"]} problems, greedy: exact match '
                f'{g["accuracy"]:.3f} [{lo:.3f}, {hi:.3f}] ({g["correct"]}/{g["total"]}). A '
                'model of a few million parameters is expected near zero here.']
  if 'tools' in main['eval']:
    lines += tools_eval.report_lines(main['eval'], main['eval']['tools'])
  lines += ['', '## Chat samples (greedy)', '']
  for turn in main['eval']['chat']:
    lines += [f'> user: {turn["user"]}', '>', f'> assistant: {turn["assistant"]}', '']
  return '\n'.join(lines) + '\n'


def write(workdir) -> str:
  """Rebuilds report.md of an SFT workdir from its eval.json files; returns the text."""
  workdir = pathlib.Path(workdir)
  if not (workdir / EVAL_FILE).exists():
    raise FileNotFoundError(f'{workdir / EVAL_FILE}: no evaluation (is the run finished?)')
  main = json.loads((workdir / EVAL_FILE).read_text())
  twin = None
  for fmt in TWIN_FORMATS:
    if fmt != main['format'] and (workdir / fmt / EVAL_FILE).exists():
      twin = json.loads((workdir / fmt / EVAL_FILE).read_text())
  text = report(main, twin, checkpoint_lib.load_config(workdir))
  (workdir / 'report.md').write_text(text)
  return text


def main(argv) -> int:
  return common.report_cli(argv, 'sft_report', write)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
