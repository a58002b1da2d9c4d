"""Look inside a checkpoint: logit lens and per-head attention maps of one prompt, as PNGs.

  python -m experiments.inspect --workdir=runs/pretrain --prompt="The Congress shall" \
      [--out=runs/pretrain/inspect]

Writes OUT/logit_lens.png (layers × positions: the top next token read from each
layer's residual stream, coloured by its probability; the last row is the model's own
prediction) and OUT/attention_layer<i>.png (one panel per head: queries down, keys
across). research/interpret.py computes both.
"""
import pathlib

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from absl import flags, logging  # pylint: disable=g-import-not-at-top

from experiments import common  # pylint: disable=g-import-not-at-top
from research import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from research import interpret  # pylint: disable=g-import-not-at-top
from research import model as model_lib  # pylint: disable=g-import-not-at-top

_WORKDIR = None
_PROMPT = None
_OUT = None
_MAX_TOKENS = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _WORKDIR, _PROMPT, _OUT, _MAX_TOKENS
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run.')
  _PROMPT = flags.DEFINE_string('prompt', None, 'The text to inspect.')
  _OUT = flags.DEFINE_string('out', '', 'Output folder (default: WORKDIR/inspect).')
  _MAX_TOKENS = flags.DEFINE_integer('max_tokens', 32, 'Keep the last this many tokens.')


def _label(tokenizer, i):
  return tokenizer.id_to_piece(int(i)).replace('\u2581', '_')


def plot_logit_lens(lens, tokenizer, tokens, path):
  """lens (L+1)×T×V log-probs -> a heatmap of the top token's probability, annotated."""
  top = lens.argmax(-1)
  prob = np.exp(lens.max(-1))
  layers, t = prob.shape
  fig, ax = plt.subplots(figsize=(1.0 + 0.9 * t, 0.9 + 0.45 * layers))
  im = ax.imshow(prob, cmap='viridis', vmin=0, vmax=1, aspect='auto', origin='lower')
  for l in range(layers):
    for j in range(t):
      ax.text(j, l, _label(tokenizer, top[l, j])[:8], ha='center', va='center', fontsize=7,
              color='white' if prob[l, j] < 0.5 else 'black')
  ax.set_xticks(range(t), [_label(tokenizer, x) for x in tokens], rotation=60, fontsize=7)
  ax.set_yticks(range(layers), ['embed'] + [f'layer {i}' for i in range(1, layers)])
  ax.set_xlabel('input token (the cell: top next-token read from that layer)')
  fig.colorbar(im, ax=ax, label='probability of the top token')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_attention(maps_NxTxT, tokenizer, tokens, layer, path):
  n = maps_NxTxT.shape[0]
  cols = min(n, 4)
  rows = -(-n // cols)
  labels = [_label(tokenizer, x) for x in tokens]
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
  for h in range(rows * cols):
    ax = axes[h // cols][h % cols]
    if h >= n:
      ax.axis('off')
      continue
    ax.imshow(maps_NxTxT[h], cmap='magma', vmin=0, vmax=1)
    ax.set_title(f'layer {layer} head {h}', fontsize=9)
    if len(tokens) <= 24:
      ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
      ax.set_yticks(range(len(tokens)), labels, fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise checkpoint_lib.CheckpointError(f'unexpected arguments {argv[1:]}')
  if not _WORKDIR.value or not _PROMPT.value:
    raise checkpoint_lib.CheckpointError('--workdir and --prompt are required')
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  params, config, tokenizer = checkpoint_lib.load_stage(_WORKDIR.value)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  tokens = tokenizer.encode_text(_PROMPT.value)[-_MAX_TOKENS.value:]
  if not tokens:
    raise checkpoint_lib.CheckpointError('--prompt: no tokens')
  lens = interpret.logit_lens(params, cfg, tokens)
  maps = interpret.attention_maps(params, cfg, tokens)
  out = pathlib.Path(_OUT.value or pathlib.Path(_WORKDIR.value) / 'inspect')
  out.mkdir(parents=True, exist_ok=True)
  plot_logit_lens(lens, tokenizer, tokens, out / 'logit_lens.png')
  for layer, m in enumerate(maps):
    plot_attention(m, tokenizer, tokens, layer, out / f'attention_layer{layer}.png')
  top = [_label(tokenizer, i) for i in lens[:, -1].argmax(-1)]
  print(f'{len(tokens)} tokens; next token read at each layer (embed..last): {top}')
  print(f'wrote {out}/logit_lens.png and {len(maps)} attention_layer*.png')


if __name__ == '__main__':
  define_flags()
  common.run_main(main)
