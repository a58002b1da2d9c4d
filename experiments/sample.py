"""Sample from, or fill masks with, any pretraining checkpoint.

  python -m experiments.sample --workdir=runs/x --prompt="The Congress" [--prompt=...]
      [--max_new_tokens=64] [--temperature=0.8] [--top_k=0] [--top_p=0.95] [--seed=0]
  python -m experiments.sample --workdir=runs/x --fill="The quick brown <mask> jumps"
      [--fill_mode=iterative|one_pass]

The checkpoint's objective decides how the model reads its input: prefix-LM and span
checkpoints read the prompt bidirectionally (as trained); masked checkpoints fill masks
in place, hybrid ones from the previous position (MNTP), and causal / prefix / span
ones with left context only. Asking a checkpoint for what it was not trained to do
works but prints a note. Errors (no checkpoint, bad flags) are one line on stderr.

Prompts are text: a literal "<mask>", "<extra_id_0>" or "<|user|>" in --prompt is
encoded as those characters, never as the reserved token (in --fill only "<mask>" is
the mask). Length rule: a prompt of P tokens continued by N = --max_new_tokens needs
P + N - 1 <= model.max_len positions, for learned and RoPE positions alike (a RoPE
model was never trained past max_len); a longer request is a one-line error naming
the lengths (exit 2), never a silent truncation. A --fill text must fit in max_len.
"""
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments import common
from research import checkpoint as checkpoint_lib
from research import model as model_lib
from research import objectives as objectives_lib
from research import sampling
from research import tokenizer as tokenizer_lib

_WORKDIR = None
_PROMPT = None
_FILL = None
_FILL_MODE = None
_MAX_NEW = None
_TEMPERATURE = None
_TOP_K = None
_TOP_P = None
_SEED = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _WORKDIR, _PROMPT, _FILL, _FILL_MODE, _MAX_NEW, _TEMPERATURE, _TOP_K, _TOP_P, _SEED
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A pretraining run folder.')
  _PROMPT = flags.DEFINE_multi_string('prompt', [], 'Text to continue (repeat for a batch).')
  _FILL = flags.DEFINE_multi_string('fill', [], 'Text with <mask> tokens to fill (repeatable).')
  _FILL_MODE = flags.DEFINE_enum('fill_mode', 'iterative', ['iterative', 'one_pass'],
                                 'Fill the most confident mask first, or all at once.')
  _MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens generated per prompt.')
  _TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
  _TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
  _TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass (1: off).')
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')

UserError = common.UserError  # one line, exit 2 (common.run_main)


def continue_texts(params, cfg, tokenizer, objective: objectives_lib.Objective, prompts, *, max_new_tokens,
                   temperature, top_k, top_p, seed):
  """-> [(continuation text, Generation row as numpy dict)] for each prompt."""
  prompt, lengths = sampling.encode_prompts(tokenizer, prompts)
  for i, n in enumerate(lengths):
    if n + max_new_tokens - 1 > cfg.max_len:
      raise UserError(f'--prompt {i + 1} is {n} tokens: with --max_new_tokens={max_new_tokens} '
                      f'it needs {n + max_new_tokens - 1} positions, the model has '
                      f'{cfg.max_len} (model.max_len); shorten the prompt or lower '
                      '--max_new_tokens')
  try:
    out = sampling.generate(params, prompt, lengths, jax.random.key(seed), cfg=cfg,
                            max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k,
                            top_p=top_p,
                            bidirectional_prompt=objective.bidirectional_prompt)
  except ValueError as e:  # e.g. learned positions too short
    raise UserError(str(e)) from None
  out = jax.tree.map(np.asarray, out)
  results = []
  for i in range(len(prompts)):
    n = int(out.lengths_B[i])
    tokens = [t for t in out.tokens_BxN[i, :n] if t != tokenizer.eos_id]
    results.append((tokenizer.decode(tokens),
                    dict(tokens=n, eos=bool(out.done_B[i]),
                         mean_logprob=float(out.logprobs_BxN[i, :n].mean()))))
  return results


def fill_ids(tokenizer, text: str) -> list[int]:
  """Token ids of a --fill text: each "<mask>" the mask id, everything else text
  (`encode_text`, so "<extra_id_0>" or "<|user|>" in it is not a reserved id)."""
  ids = []
  for i, part in enumerate(text.split('<mask>')):
    ids += ([tokenizer.mask_id] if i else []) + tokenizer.encode_text(part)
  return ids


def fill_texts(params, cfg, tokenizer, objective: objectives_lib.Objective, texts, *, iterative: bool):
  """-> [(filled text, [(piece, probability) per mask])] for each text."""
  encoded = [fill_ids(tokenizer, t) for t in texts]
  for i, (text, ids) in enumerate(zip(texts, encoded)):
    if tokenizer.mask_id not in ids:
      raise UserError(f'--fill={text!r}: no <mask> in the text')
    if len(ids) > cfg.max_len:
      raise UserError(f'--fill {i + 1} is {len(ids)} tokens, the model has {cfg.max_len} '
                      'positions (model.max_len); shorten it')
  tokens, lengths = sampling.encode_prompts(tokenizer, texts,
                                            encode=lambda t: fill_ids(tokenizer, t))
  special = tuple(int(i) for i in np.flatnonzero(
      tokenizer_lib.is_special(np.arange(tokenizer.vocab_size))))
  filled, logps = sampling.fill_mask(
      params, tokens, lengths, cfg=cfg, mask_id=tokenizer.mask_id, suppress_ids=special,
      iterative=iterative, bidirectional=objective.bidirectional_fill,
      shift=objective.readout == 'next')
  filled, logps = np.asarray(filled), np.asarray(logps)
  results = []
  for i, ids in enumerate(encoded):
    at = [j for j, t in enumerate(ids) if t == tokenizer.mask_id]
    results.append((tokenizer.decode(filled[i, :len(ids)]),
                    [(tokenizer.id_to_piece(filled[i, j]), float(np.exp(logps[i, j])))
                     for j in at]))
  return results


def run(workdir, prompts, fills, *, fill_mode='iterative', max_new_tokens=64,
        temperature=0.8, top_k=0, top_p=0.95, seed=0, log=print):
  """Loads the checkpoint and prints samples / fills; returns them for tests."""
  if not prompts and not fills:
    raise UserError('nothing to do: give --prompt="..." and/or --fill="... <mask> ..."')
  if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise UserError('need --max_new_tokens >= 1, --temperature >= 0, --top_k >= 0, '
                    '0 < --top_p <= 1')
  for flag, texts in (('--prompt', prompts), ('--fill', fills)):
    for i, text in enumerate(texts):
      problem = tokenizer_lib.text_problem(text)
      if problem:
        raise UserError(f'{flag} {i + 1}: {problem}')
  start = time.time()
  params, config, tokenizer = checkpoint_lib.load_stage(workdir)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  if cfg.scalar_head:
    raise UserError(f'{workdir} holds a reward/value model (a scalar head), not a language '
                    'model to sample from')
  try:
    objective = objectives_lib.get(config.get('objective', {}).get('name', 'causal'))
  except ValueError as e:
    raise UserError(f'{workdir}: {e}') from None
  log(f'{workdir}: {objective.name} checkpoint, {cfg.num_layers} layers, d {cfg.d_model}, '
      f'loaded in {time.time() - start:.1f}s')
  out = {}
  if prompts:
    if not objective.can_generate:
      log(f'note: a {objective.name} checkpoint was not trained to continue text left to right')
    start = time.time()
    out['samples'] = continue_texts(params, cfg, tokenizer, objective, prompts,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed)
    log(f'sampled in {time.time() - start:.1f}s (temperature {temperature}, top-k {top_k}, '
        f'top-p {top_p}, seed {seed}; compile included)')
    for p, (text, info) in zip(prompts, out['samples']):
      log(f'\n{p!r} -> {text!r}\n  {info["tokens"]} tokens, '
          f'{"ended at eos" if info["eos"] else "cut at --max_new_tokens"}, '
          f'mean log-prob {info["mean_logprob"]:.2f}')
  if fills:
    out['fills'] = fill_texts(params, cfg, tokenizer, objective, fills,
                              iterative=fill_mode == 'iterative')
    if not objective.bidirectional_fill:
      log(f'note: a {objective.name} checkpoint fills masks from their left context only')
    for f, (text, picks) in zip(fills, out['fills']):
      log(f'\n{f!r} -> {text!r}\n  ' + ', '.join(f'{p!r} ({q:.2f})' for p, q in picks))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs restores at INFO
  try:
    if not _WORKDIR.value:
      raise UserError('--workdir is required (a pretraining run folder)')
    run(_WORKDIR.value, _PROMPT.value, _FILL.value, fill_mode=_FILL_MODE.value,
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, seed=_SEED.value)
  except (UserError, checkpoint_lib.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  define_flags()
  common.run_main(main)  # (a bad flag: one line, exit 2)
