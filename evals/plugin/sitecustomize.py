"""Registers the lm_eval model 'research' in processes started as `lm_eval` / `lm-eval`.

    PYTHONPATH=$PWD:$PWD/evals/plugin lm_eval --model research --model_args workdir=runs/x ...

Python imports `sitecustomize` at start-up from the path; this one does nothing unless
the script is lm-eval's, and then only adds a lazy entry ('research' ->
research.lm_eval_model:ResearchLM): JAX and the model load when the harness asks for it.
The harness's built-in names are registered first (a non-empty registry skips them).
"""
import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else '') in ('lm_eval', 'lm-eval'):
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  import lm_eval.models  # noqa: F401  pylint: disable=unused-import
  from lm_eval.api.registry import model_registry
  if 'research' not in model_registry:
    model_registry.register('research', target='research.lm_eval_model:ResearchLM')
