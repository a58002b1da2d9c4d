"""Pretrain a Transformer with any objective; resumable, sharded, logged.

  python -m experiments.pretrain --config=configs/pretrain.py:tiny \
      --config.model.num_layers=4 --workdir=runs/x

Re-running with the same workdir resumes from its latest complete checkpoint
(SIGTERM / Ctrl-C save before exiting). The workdir then holds everything a later
stage needs: config.json, tokenizer.model, checkpoints/ (see research/checkpoint.py).
"""
import json
import pathlib
import time

from experiments import common
from experiments import loop as loop_lib
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import model as model_lib
from research import objectives as objectives_lib
from research import shards as shards_lib
from research import tokenizer as tokenizer_lib

SAMPLE_PROMPTS = ('The Congress', 'In the year', 'We must')


def make_objective(objective_config: dict):
  """The objective of a config's `objective` section: its record says which keys it takes."""
  try:
    return objectives_lib.from_config(objective_config)
  except ValueError as e:
    raise common.UserError(f'objective.name: {e}') from None


def prepare_shards(config: dict, workdir: pathlib.Path) -> loop_lib.LMSetup:
  """The setup of `data.shards`: rows read lazily from prepared shards (one folder or a
  weighted mixture), split by document as in memory, the shards' tokenizer."""
  dc = config['data']
  split_seed = dc.get('split_seed', config['seed'])
  opened = shards_lib.open_training_data(dc['shards'], dc['validation_fraction'],
                                         dc['seq_len'], split_seed)
  tokenizer = opened.tokenizer
  if tokenizer.vocab_size != config['tokenizer']['vocab_size']:
    raise common.UserError(f'tokenizer.vocab_size={config["tokenizer"]["vocab_size"]}, the '
                           f'shards\' tokenizer has {tokenizer.vocab_size}')
  own = workdir / checkpoint_lib.TOKENIZER_FILE
  if own.exists() and tokenizer_lib.Tokenizer.load(own).fingerprint != tokenizer.fingerprint:
    raise common.UserError(f'{own}: another tokenizer than the shards\' ({dc["shards"]})')
  try:
    model_cfg = model_lib.TransformerConfig.from_dict(config['model'])
  except (ValueError, TypeError) as e:
    raise common.UserError(f'model config: {e}') from None
  return loop_lib.LMSetup(config=config, model_cfg=model_cfg, tokenizer=tokenizer,
                          train_rows=opened.train, validation_rows=opened.validation,
                          data_identity=opened.identity)


def prepare(config: dict, workdir: pathlib.Path) -> loop_lib.LMSetup:
  """Tokenizer (trained once per workdir, or reused) and packed train/validation rows."""
  dc = config['data']
  if dc.get('shards'):
    return prepare_shards(config, workdir)
  docs = data_lib.load_corpus(dc['corpus'], text_field=dc['text_field'])
  # data.split_seed (optional) fixes the split across seeds, so a multi-seed study
  # holds out the same documents in every run.
  train_docs, val_docs = data_lib.split_documents(docs, dc['validation_fraction'],
                                                  seed=dc.get('split_seed', config['seed']))
  t0 = time.time()
  try:
    tokenizer, trained = tokenizer_lib.load_or_train(
        (workdir / checkpoint_lib.TOKENIZER_FILE, config['tokenizer']['path']),
        lambda: (d.text for d in train_docs), config['tokenizer']['vocab_size'],
        seed=config['seed'])
  except tokenizer_lib.TextError as e:  # not the vocabulary's fault
    raise common.UserError(str(e)) from None
  except ValueError as e:
    raise common.UserError(f'tokenizer.vocab_size: {e}') from None
  if trained:
    common.log(f'tokenizer: trained vocab {tokenizer.vocab_size} in {time.time() - t0:.1f}s')
  try:
    model_cfg = model_lib.TransformerConfig.from_dict(config['model'])
  except (ValueError, TypeError) as e:
    raise common.UserError(f'model config: {e}') from None
  seq_len = dc['seq_len']
  return loop_lib.LMSetup(config=config, model_cfg=model_cfg, tokenizer=tokenizer,
                          train_rows=data_lib.pack_documents(tokenizer, train_docs, seq_len),
                          validation_rows=data_lib.pack_documents(tokenizer, val_docs, seq_len))


def train(config, workdir) -> dict:
  """Runs (or resumes) pretraining in `workdir`; returns the summary dict (also in
  summary.json): step, final_train_loss, validation {objective_loss, causal_loss},
  unigram_entropy, params, flops_per_token, samples, interrupted, loop."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  common.validate_config(config)
  common.check_workdir(workdir)
  workdir = pathlib.Path(workdir)
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(
        saved, config, workdir, keys=('model', 'tokenizer', 'objective', 'data', 'optimizer',
                                      'seed'), ignore=checkpoint_lib.RESUMABLE_CHANGES)
  mesh = common.make_mesh(config['mesh']['shape'])
  setup = prepare(config, workdir)
  summary, _ = loop_lib.train_language_model(setup, workdir, make_objective(config['objective']),
                                             mesh, fresh_config=saved is None,
                                             sample_prompts=SAMPLE_PROMPTS)
  return summary


def main(config, workdir):
  common.maybe_initialize_distributed()
  summary = train(config, workdir)
  if any(v is not None for v in summary['validation'].values()):  # else: no validation split
    common.log('\nfinal validation: ' + json.dumps(summary['validation']))
  common.log(f'unigram entropy of the corpus: {summary["unigram_entropy"]:.3f} nats/token')
  for s in summary['samples']:
    common.log(f'sample: {s!r}')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/pretrain.py:tiny', 'runs/pretrain')
