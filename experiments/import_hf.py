"""Import a Hugging Face Llama (or Arcee) checkpoint directory as a finished stage.

  python -m experiments.import_hf --model=hf/some-llama --workdir=runs/imported \\
      [--tokenizer=runs/pretrain/tokenizer.model] [--config.scan_layers=false]

--model is a local directory (no network): config.json plus model.safetensors (or a
sharded model.safetensors.index.json). --workdir gets what a finished stage holds, so
`research.checkpoint.load_stage` loads it and later stages start from it
(`python -m experiments.sft --init=runs/imported`):

  config.json       model (from the HF config; training-only keys from the stashed
                    config of a checkpoint exported here), tokenizer, objective
  tokenizer.model   the checkpoint's own tokenizer.model, or --tokenizer's
  checkpoints/0/    the params (Orbax, as every stage writes them), meta

This codebase's tokenizers have a fixed table of reserved ids (research/tokenizer.py);
a checkpoint whose tokenizer.model lacks them (e.g. Meta's Llama) needs --tokenizer
with one of ours of the same vocabulary size. Any problem (an unsupported config key,
a missing tensor, a vocabulary mismatch, an existing run in --workdir) is one line on
stderr and exit status 2, with nothing written.
"""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common
from research import checkpoint as checkpoint_lib
from research import hf
from research import model as model_lib
from research import tokenizer as tokenizer_lib

_MODEL = flags.DEFINE_string('model', None, 'A local transformers checkpoint directory.')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, "A tokenizer.model of ours (or a run folder holding one), when the "
    "checkpoint has none with this codebase's reserved ids.")


def read_safetensors(model_dir: pathlib.Path) -> dict:
  """{name: numpy array} of model.safetensors or of every shard its index names."""
  from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
  index = model_dir / 'model.safetensors.index.json'
  if index.exists():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  elif (model_dir / 'model.safetensors').exists():
    files = ['model.safetensors']
  else:
    raise common.UserError(f'--model={model_dir}: no model.safetensors (or .index.json); '
                           'save with safe_serialization')
  state = {}
  for name in files:
    state.update(safetensors_np.load_file(str(model_dir / name)))
  return state


def find_tokenizer(model_dir: pathlib.Path, flag) -> tuple[tokenizer_lib.Tokenizer, str]:
  """-> (tokenizer, where it came from): --tokenizer if given, else DIR/tokenizer.model."""
  if flag:
    path = pathlib.Path(flag)
    if path.is_dir():
      path = path / checkpoint_lib.TOKENIZER_FILE
  else:
    path = model_dir / checkpoint_lib.TOKENIZER_FILE
    if not path.exists():
      raise common.UserError(f'--model={model_dir}: no tokenizer.model; pass '
                             '--tokenizer=FILE (one of ours, same vocabulary size)')
  if not path.is_file():
    raise common.UserError(f'--tokenizer={flag}: no such file')
  try:
    return tokenizer_lib.Tokenizer.load(path), str(path)
  except (ValueError, RuntimeError) as e:
    hint = '' if flag else ' (pass --tokenizer=FILE, one of ours)'
    raise common.UserError(f'{path}: {str(e).splitlines()[0]}{hint}') from None


def import_checkpoint(model_dir, workdir, tokenizer_path=None, scan_layers: bool = True,
                      max_len: int = 0, log=common.log) -> pathlib.Path:
  """Converts the HF checkpoint in `model_dir` into the finished stage `workdir`.

  Raises:
    common.UserError: as the module docstring lists; nothing is written then.
  """
  if not model_dir:
    raise common.UserError('--model is required (a local transformers checkpoint directory)')
  model_dir, workdir = pathlib.Path(model_dir), pathlib.Path(workdir)
  if not (model_dir / 'config.json').is_file():
    raise common.UserError(f'--model={model_dir}: no config.json')
  common.check_new_dir(workdir, '--workdir')  # new or empty: never mixes with a run
  hf_config = json.loads((model_dir / 'config.json').read_text())
  try:
    model = hf.model_config_from_hf(hf_config)
  except hf.ConversionError as e:
    raise common.UserError(f'{model_dir}/config.json: {e}') from None
  stashed = (hf_config.get(hf.RESEARCH_KEY) or {})
  if 'scan_layers' not in (stashed.get('model') or {}):
    model['scan_layers'] = bool(scan_layers)
  if max_len:
    model['max_len'] = int(max_len)
  tokenizer, tokenizer_source = find_tokenizer(model_dir, tokenizer_path)
  if tokenizer.vocab_size != model['vocab_size']:
    raise common.UserError(f'{tokenizer_source}: vocabulary {tokenizer.vocab_size} != the '
                           f'checkpoint\'s vocab_size {model["vocab_size"]}')
  try:
    params = hf.params_from_hf_state_dict(read_safetensors(model_dir), model)
  except hf.ConversionError as e:
    raise common.UserError(f'{model_dir}: {e}') from None
  cfg = model_lib.TransformerConfig.from_dict(model)
  z = jnp.zeros((1, 8), jnp.int32)
  expected = nn.unbox(jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z,
                                     z, jnp.zeros((1, 8), bool))['params'])
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(
      got) != jax.tree.leaves(expected):
    raise common.UserError(f'{model_dir}: converted params do not match the model config '
                           '(a bug in research/hf.py)')
  objective = stashed.get('objective') or 'causal'
  config = dict(model=model, tokenizer=dict(vocab_size=tokenizer.vocab_size,
                                            path=tokenizer_source),
                objective=dict(name=objective), imported_from=str(model_dir.absolute()),
                seed=0)

  def write_config(path):
    checkpoint_lib.write_json_atomic(path, config)

  def write_checkpoint(path):
    ckpt = checkpoint_lib.Checkpointer(path.parent, keep=1, async_save=False)
    try:
      ckpt.save(0, {'params': jax.tree.map(jnp.asarray, params)}, None,
                dict(step=0, tokenizer_fingerprint=tokenizer.fingerprint,
                     imported_from=str(model_dir.absolute())))
      ckpt.wait()
    finally:
      ckpt.close()

  common.write_dir_atomic(workdir, {
      checkpoint_lib.CONFIG_FILE: write_config,
      checkpoint_lib.TOKENIZER_FILE: tokenizer.to_bytes(),
      'checkpoints': write_checkpoint,
  })
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  log(f'{model_dir} -> {workdir}: {cfg.num_layers} layers, d {cfg.d_model}, '
      f'{n / 1e6:.2f}M params ({cfg.param_dtype}), tokenizer {tokenizer.fingerprint}')
  return workdir


def main(config, workdir):
  import_checkpoint(_MODEL.value, workdir, _TOKENIZER.value, scan_layers=config.scan_layers,
                    max_len=config.max_len)


if __name__ == '__main__':
  common.run_experiment(main, 'configs/hf.py', 'runs/imported')
