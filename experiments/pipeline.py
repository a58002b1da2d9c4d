"""The whole pipeline on the embedded corpus, stage by stage (the README's main job).

  python -m experiments.pipeline [--workdir=runs/pipeline] [--config.train.steps=...]

Stage 1: train a sentencepiece tokenizer on the corpus; stage 2: pretrain the `tiny`
model (causal LM) and print samples and the final validation loss next to the
corpus's unigram entropy; stage 3: fine-tune it on conversations (configs/sft.py:quick)
and hold a short greedy conversation with the result. Each stage writes its own
subfolder of the workdir and is resumed, not redone, when the command runs again.
Later stages (reward model, PPO) start from `WORKDIR/sft`.
"""
import json
import pathlib

import jax
from configs import sft as sft_config
from experiments import chat
from experiments import common
from experiments import pretrain
from experiments import sft

# The main job must end within about 10 minutes on 2 cores: each stage stops (and saves)
# at these limits. Override pretraining's with --config.train.max_minutes.
MAX_PRETRAIN_MINUTES = 6.0
MAX_SFT_MINUTES = 2.5
CONVERSATION = ('Hello! How are you?',
                'Sam has 5 pens. He buys 3 more. How many pens does Sam have?')


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
  out = {'pretrain': summary}

  common.log(f'\n== supervised fine-tuning (configs/sft.py:quick) in {workdir / "sft"}')
  tuning = sft_config.get_config('quick')
  tuning.train.max_minutes = MAX_SFT_MINUTES
  tuning.data.seq_len = min(tuning.data.seq_len, config.data.seq_len)
  result = sft.finetune(tuning, workdir / 'sft', workdir / 'pretrain')
  if not result.get('interrupted'):
    losses = result['eval']['heldout_assistant_loss']
    common.log('held-out loss on assistant tokens: ' +
               ', '.join(f'{k} {v:.3f}' for k, v in losses.items()))
    by_k = result['eval'].get('word_problems_by_k', {})
    common.log('word problems solved (greedy), by number of steps: ' +
               ', '.join(f'k={k}: {r["correct"]}/{r["total"]}' for k, r in by_k.items()))
    common.log('\n== a conversation with the fine-tuned model (greedy)')
    session = chat.load_session(workdir / 'sft', temperature=0.0, max_new_tokens=48)
    for text in CONVERSATION:
      common.log(f'user> {text}')
      common.log(f'assistant> {session.reply(text)}')
    out['sft'] = result
  if jax.process_index() == 0:
    (workdir / 'pipeline.json').write_text(json.dumps(out, indent=2))
  common.log(f'\nnext: python -m experiments.chat --workdir={workdir / "sft"}')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/pretrain.py:tiny', 'runs/pipeline')
