"""lm-eval's own command line, with our model registered: every harness flag works.

  python -m experiments.lm_eval_cli run --model research \
      --model_args workdir=runs/sft --batch_size 16 --include_path evals/tasks \
      --tasks piqa_local --limit 100 [--apply_chat_template]

The plain `lm_eval` / `lm-eval` script cannot find the model by itself: lm_eval 0.4.13
builds the model before it resolves any task file, so a `--include_path` YAML cannot
register it, and there is no installable package here for an entry point. Either use
this module, or put `evals/plugin` on PYTHONPATH (its sitecustomize.py registers the
name 'research' lazily when the running script is lm_eval):

  PYTHONPATH=$PWD:$PWD/evals/plugin lm_eval --model research --model_args workdir=runs/sft \
      --include_path evals/tasks --tasks piqa_local
"""
import os

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

from research import lm_eval_model  # pylint: disable=g-import-not-at-top,unused-import

if __name__ == '__main__':
  cli_evaluate()
