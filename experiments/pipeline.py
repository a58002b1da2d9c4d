"""The whole pipeline on the embedded corpus, stage by stage (the README's main job).

  python -m experiments.pipeline [--workdir=runs/pipeline] [--config.train.steps=...]

Stage 1: train a sentencepiece tokenizer on the corpus; stage 2: pretrain the `tiny`
model (causal LM) and print samples and the final validation loss next to the
corpus's unigram entropy. Each stage writes its own subfolder of the workdir and is
resumed, not redone, when the command runs again. Later stages (SFT, reward model,
PPO, tool use) hand over through these folders.
"""
import json
import pathlib

import jax
from experiments import common
from experiments import pretrain



# The main job must end within 10 minutes on 2 cores: training stops (and saves) here at
# the latest. Override with --config.train.max_minutes.
MAX_PRETRAIN_MINUTES = 7.0


def main(config, workdir):
  common.maybe_initialize_distributed()
  if not config.train.max_minutes:
    config.train.max_minutes = MAX_PRETRAIN_MINUTES
  workdir = pathlib.Path(workdir)
  common.log(f'== pretraining ({config.preset}, {config.objective.name}) in {workdir / "pretrain"}')
  summary = pretrain.train(config, workdir / 'pretrain')
  v = summary['validation']
  common.log('\n== samples (greedy)')
  for s in summary['samples']:
    common.log(f'  {s!r}')
  common.log(f'\n== final validation loss {v["causal_loss"]:.3f} nats/token after '
             f'{summary["step"]} steps; unigram entropy of the corpus '
             f'{summary["unigram_entropy"]:.3f} nats/token')
  if jax.process_index() == 0:
    (workdir / 'pipeline.json').write_text(json.dumps({'pretrain': summary}, indent=2))


if __name__ == '__main__':
  common.run_experiment(main, 'configs/pretrain.py:tiny', 'runs/pipeline')
