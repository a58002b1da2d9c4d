"""The post-training stages in one process, for tests/test_multihost.py: run as 1 process
× 8 devices or under experiments.launch as 2 × 4, each on a (2, 2, 2) mesh.

  python -m tests.multihost_stages --root=ROOT --out=DIR [--stages=rl,sft,dpo] [--resume_rl=DIR]

ROOT holds `corpus/`, `pretrain/` (a stage) and `pairs.jsonl` (tests/test_multihost.py
writes them). Each stage is a short run in OUT/<stage>; one process runs them all so
that JAX starts (and the processes connect) once. `--resume_rl=DIR`: then the RL stage
again in DIR, a copy of another run's RL workdir whose last checkpoint was removed (it
resumes from the one before, with the programs already compiled).
"""
import argparse
import pathlib
import sys

from absl import flags

from experiments import common

MESH = '(2,2,2)'


def _set(config, **values):
  for name, value in values.items():
    common.apply_override(config, name.replace('__', '.'), str(value))
  return config


def rl_config(root):
  from configs import rlhf as rlhf_config  # pylint: disable=g-import-not-at-top
  return _set(rlhf_config.get_config('test'), data__corpus=root / 'corpus',
              data__min_sentence_words=6, data__min_words=2, data__max_words=4,
              ppo__iterations=3, checkpoint_every=2, eval__every=3, eval__best_of_n=(1, 2),
              eval__num_samples=2, reward_model__train__steps=4,
              reward_model__eval__before=False, reward_model__train__log_every=1,
              mesh__shape=MESH)


def sft_config():
  from configs import sft as sft_config_lib  # pylint: disable=g-import-not-at-top
  return _set(sft_config_lib.get_config('test'), data__seq_len=192, data__num_train=32,
              data__batch_size=8, data__weights__chatterbot=0.0, data__weights__gsm8k=0.0,
              data__word_problems__num_train=32, train__steps=3, train__log_every=1,
              train__eval_every=0, train__eval_batches=1, eval__word_problems_per_k=1,
              eval__max_new_tokens=2, mesh__shape=MESH)


def dpo_config(root):
  from configs import dpo as dpo_config_lib  # pylint: disable=g-import-not-at-top
  return _set(dpo_config_lib.get_config('test'), data__path=root / 'pairs.jsonl',
              train__steps=3, data__seq_len=48, data__batch_size=8, train__log_every=1,
              train__checkpoint_every=2, train__eval_every=0, data__heldout_fraction=0.25,
              mesh__shape=MESH)


def main(argv) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--root', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--stages', default='rl,sft,dpo')
  parser.add_argument('--resume_rl', default='')
  args = parser.parse_args(argv)
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags outside absl.app.run
  common.maybe_initialize_distributed()
  from experiments import dpo, rlhf, sft  # pylint: disable=g-import-not-at-top
  root, out = pathlib.Path(args.root), pathlib.Path(args.out)
  init = root / 'pretrain'
  for stage in args.stages.split(','):
    if stage == 'rl':
      rlhf.run(rl_config(root), out / 'rl', init)
    elif stage == 'sft':
      sft.finetune(sft_config(), out / 'sft', init)
    elif stage == 'dpo':
      dpo.train(dpo_config(root), out / 'dpo', init)
    else:
      raise SystemExit(f'unknown stage {stage}')
  if args.resume_rl:
    rlhf.run(rl_config(root), pathlib.Path(args.resume_rl), init)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
