"""The whole pipeline, raw text to an aligned chat model, in one command (the main job).

  python -m experiments.pipeline [--config=configs/pipeline.py:tiny] [--workdir=runs/pipeline]
  python -m experiments.pipeline --config.from_stage=sft      # rerun from SFT on

Stages, each in its own folder of the workdir and each starting from the previous
stage's checkpoint:

  pretrain   a sentencepiece tokenizer and the Transformer, causal LM on the embedded
             corpus (experiments.pretrain)
  sft        conversations with the loss on assistant tokens: everyday chat and
             synthetic word problems (experiments.sft)
  rlhf       a proxy reward model on gold-labelled pairs of the SFT policy's samples
             (rlhf/reward_model), then PPO against it with a KL penalty, best-of-n and the
             over-optimisation curves (experiments.rlhf)

A stage whose summary exists is skipped; a killed run restarts where it stopped (each
stage resumes from its own checkpoints) and, without time caps, ends with the same
numbers. `from_stage` moves that stage's folder and the later ones aside (to
`WORKDIR/previous/<stage>-<n>`, nothing is deleted) and reruns them. At the end the
report card, `report.md` and `report.json`, is rebuilt from the stages' files by
experiments.pipeline_report.
"""
import json
import pathlib
import time

import jax
from experiments import common
from experiments import pipeline_report
from experiments import pretrain
from experiments import rlhf
from experiments import sft

STAGES = ('pretrain', 'sft', 'rlhf')
TIMES_FILE = 'stage_times.json'


def _done(workdir: pathlib.Path, stage: str) -> bool:
  """A stage is done when it left its final summary (a signal leaves none, or one that
  says so; a time cap counts as done)."""
  path = workdir / stage / {'pretrain': 'summary.json', 'sft': 'eval.json',
                            'rlhf': 'summary.json'}[stage]
  return path.exists() and not json.loads(path.read_text()).get('stopped_by_signal')


def _move_aside(workdir: pathlib.Path, from_stage: str) -> None:
  if from_stage not in STAGES:
    raise common.UserError(f'from_stage={from_stage!r}: expected one of {STAGES}')
  for stage in STAGES[STAGES.index(from_stage):]:
    folder = workdir / stage
    if folder.exists():
      n = 0
      while (workdir / 'previous' / f'{stage}-{n}').exists():
        n += 1
      (workdir / 'previous').mkdir(parents=True, exist_ok=True)
      folder.rename(workdir / 'previous' / f'{stage}-{n}')
      common.log(f'moved {folder} aside to {workdir / "previous" / f"{stage}-{n}"}')


def run(config, workdir) -> dict:
  """Runs (or resumes) every stage in order; returns the report card's dict."""
  workdir = pathlib.Path(workdir)
  if config.from_stage:
    _move_aside(workdir, config.from_stage)
  workdir.mkdir(parents=True, exist_ok=True)
  times_path = workdir / TIMES_FILE
  times = json.loads(times_path.read_text()) if times_path.exists() else {}
  start_all = time.time()
  for i, stage in enumerate(STAGES, 1):
    if _done(workdir, stage):
      common.log(f'== [{i}/{len(STAGES)}] {stage}: done before, skipped')
      continue
    common.log(f'\n== [{i}/{len(STAGES)}] {stage} in {workdir / stage}')
    start = time.time()
    if stage == 'pretrain':
      result = pretrain.train(config.pretrain, workdir / 'pretrain')
    elif stage == 'sft':
      result = sft.finetune(config.sft, workdir / 'sft', workdir / 'pretrain')
    else:
      result = rlhf.run(config.rlhf, workdir / 'rlhf', workdir / 'sft')
    times[stage] = times.get(stage, 0.0) + time.time() - start
    if jax.process_index() == 0:
      times_path.write_text(json.dumps(times, indent=2))
    if result.get('interrupted') and not _done(workdir, stage):
      common.log(f'{stage} stopped early: run the same command again to resume')
      return {}
    common.log(f'== {stage} finished ({times[stage] / 60:.1f} min in all; '
                f'{(time.time() - start_all) / 60:.1f} min of this run so far)')
  card = pipeline_report.write(workdir) if jax.process_index() == 0 else {}
  return card


def main(config, workdir):
  common.maybe_initialize_distributed()
  card = run(config, workdir)
  if not card:
    return
  workdir = pathlib.Path(workdir)
  common.log('\n' + pipeline_report.headline(card))
  common.log(f'\nreport card: {workdir / "report.md"} (and report.json)')
  common.log(f'next: python -m experiments.chat --workdir={workdir / "rlhf" / "policy"}   '
             f'# talk to the final policy\n'
             f'      python -m experiments.chat --workdir={workdir / "sft"}   # the SFT model\n'
             f'      python -m experiments.sample --workdir={workdir / "pretrain"} '
             '--prompt="The Congress"')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/pipeline.py:tiny', 'runs/pipeline')
