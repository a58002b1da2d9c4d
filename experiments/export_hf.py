"""Export any finished stage to a Hugging Face transformers checkpoint directory.

  python -m experiments.export_hf --workdir=runs/sft --out=hf/sft [--config.dtype=bfloat16]

--workdir is a finished run (pretraining, SFT, a reward model, or an RLHF run's
`policy/`): whatever research.checkpoint.load_stage loads. --out gets, with no custom
code needed to read it:

  config.json              LlamaForCausalLM (SwiGLU) or ArceeForCausalLM (GELU MLP);
                           ...ForSequenceClassification for a reward model
  model.safetensors        the params, bit for bit (research/hf.py says what maps where)
  tokenizer.json           a fast tokenizer that encodes exactly as ours
  tokenizer_config.json    its settings and the chat template (Jinja)
  tokenizer.model          our SentencePiece model, for SentencePiece-based tools
  generation_config.json   stops at </s> and <|end_of_turn|>

A config that no transformers architecture represents (LayerNorm, learned positions,
...) is refused before anything is read or written: one line naming the config keys,
exit status 2. --out must not exist yet (or be empty); it appears whole or not at all.
"""
import json
import os
import pathlib

import jax
import ml_dtypes
import numpy as np
from absl import flags

from experiments import common
from research import checkpoint as checkpoint_lib
from research import hf

_OUT = flags.DEFINE_string('out', None, 'The directory to write (must not exist yet).')

FILES = ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
         'tokenizer.model', 'generation_config.json')


def export(workdir, out, dtype: str = '', log=common.log) -> pathlib.Path:
  """Writes the HF checkpoint of the stage in `workdir` to `out`; returns `out`.

  Raises:
    common.UserError: --out exists, the run has no config, the model is not
      representable (naming the config keys), or dtype is not '', 'float32', 'bfloat16'.
    checkpoint.CheckpointError: no finished checkpoint in workdir.
  """
  out = common.check_new_dir(out)
  if dtype not in ('', 'float32', 'bfloat16'):
    raise common.UserError(f"--config.dtype={dtype!r}: expected '', 'float32' or 'bfloat16'")
  config = checkpoint_lib.load_config(workdir)
  if config is None:
    raise common.UserError(f'--workdir={workdir}: no {checkpoint_lib.CONFIG_FILE}; '
                           'is this a finished run?')
  objective = (config.get('objective') or {}).get('name')
  try:
    hf_config = hf.hf_config(config['model'], objective)
    tokenizer_json = hf.tokenizer_json(checkpoint_lib.load_tokenizer(workdir))
  except hf.ConversionError as e:
    raise common.UserError(f'{workdir}: {e}') from None
  params, config, tokenizer = checkpoint_lib.load_stage(workdir)
  state = hf.to_hf_state_dict(jax.tree.map(np.asarray, params), config['model'])
  if dtype:
    target = ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.float32
    state = {k: v.astype(target) if v.ndim == 2 and k != 'score.weight' else v
             for k, v in state.items()}
    hf_config['dtype'] = dtype
    hf_config[hf.RESEARCH_KEY]['model']['param_dtype'] = dtype
  max_len = config['model']['max_len']

  def save_weights(path):
    from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
    safetensors_np.save_file(state, str(path), metadata={'format': 'pt'})
    os.chmod(path, 0o644)  # safetensors creates it owner-only; the others are 0644 too

  as_json = lambda d: (json.dumps(d, indent=2, ensure_ascii=False) + '\n').encode()
  common.write_dir_atomic(out, {
      'config.json': as_json(hf_config),
      'model.safetensors': save_weights,
      'tokenizer.json': tokenizer_json.encode(),
      'tokenizer_config.json': as_json(hf.tokenizer_config(max_len)),
      'tokenizer.model': tokenizer.to_bytes(),
      'generation_config.json': as_json(hf.generation_config()),
  })
  if objective in ('prefix', 'span'):
    log(f'note: a {objective} checkpoint read its prompts bidirectionally in training; '
        'transformers runs it causally (as our sampler does for causal checkpoints)')
  n = sum(v.size for v in state.values())
  log(f'{workdir} -> {out}: {hf_config["architectures"][0]}, {n / 1e6:.2f}M params '
      f'({hf_config["dtype"]}), vocab {tokenizer.vocab_size}')
  return out


def main(config, workdir):
  export(workdir, _OUT.value, dtype=config.dtype)


if __name__ == '__main__':
  common.run_experiment(main, 'configs/hf.py', 'runs/pretrain')
