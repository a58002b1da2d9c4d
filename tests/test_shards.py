"""Prepared token shards (research/shards.py, experiments/prepare_data.py): the streamed
rows equal the in-memory rows, hosts split them, preparation resumes after kill -9,
mixtures are deterministic and exact, pretraining on shards resumes exactly, and every
bad input is a one-line error naming its file with nothing overwritten.

Equivalence, precisely: for one corpus, tokenizer, split seed and validation fraction,
`open_training_data(...).train.rows(i)` is row i of `data.pack_documents(tokenizer,
train_docs, seq_len)` for every i (tokens, segment ids, positions; the same for the
validation rows), so `make_train_iterator` with one seed yields the same batches in the
same order from both.
"""
import gzip
import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments import common
from experiments import prepare_data
from research import data
from research import shards
from research import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ('the nation people congress year government states war peace law trade men '
         'work union great public country free power act time duty world').split()


def _text(rng, count, words=WORDS):
  return ' '.join(rng.choice(words) for _ in range(count)).capitalize() + '.\n'


def write_corpus(root: pathlib.Path, seed=0, files=4, words=WORDS) -> pathlib.Path:
  """A folder of every kind: .txt files (one document each), a .jsonl, a .jsonl.gz,
  a .parquet (a null and an empty text among its rows), a whitespace-only file
  (skipped), in a sub-folder too."""
  rng = random.Random(seed)
  (root / 'sub').mkdir(parents=True)
  for i in range(files):
    (root / ('sub' if i % 2 else '.') / f'{i:02d}.txt').write_text(
        _text(rng, rng.randint(5, 300), words), encoding='utf-8')
  (root / 'blank.txt').write_text(' \n\n', encoding='utf-8')
  lines = [json.dumps({'text': _text(rng, rng.randint(1, 80), words), 'id': i}) for i in range(15)]
  (root / 'c.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  gz = [json.dumps({'text': _text(rng, rng.randint(1, 50), words)}) for _ in range(5)]
  (root / 'sub' / 'e.jsonl.gz').write_bytes(gzip.compress('\n'.join(gz).encode()))
  texts = [_text(rng, rng.randint(1, 120), words) for _ in range(12)] + [None, '']
  pq.write_table(pa.table({'text': texts, 'n': list(range(len(texts)))}), root / 'd.parquet')
  return root


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  rng = random.Random(1)
  tokenizer = tokenizer_lib.train_tokenizer([_text(rng, 2000)], vocab_size=400)
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.model'
  tokenizer.save(path)
  return path


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus') / 'c')


@pytest.fixture(scope='module')
def prepared(corpus, tok, tmp_path_factory):
  out = tmp_path_factory.mktemp('prepared') / 'main'
  prepare_data.prepare(str(corpus), out, tokenizer=str(tok), unit_bytes=1500)
  return out


def snapshot(folder):
  return {p: p.read_bytes() for p in sorted(pathlib.Path(folder).rglob('*')) if p.is_file()}


def file_hashes(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(folder).iterdir()) if p.name.startswith('shard-')}


def one_line_error(call, *fragments, error=data.DataError):
  with pytest.raises(error) as info:
    call()
  message = str(info.value)
  assert '\n' not in message
  for fragment in fragments:
    assert str(fragment) in message, message
  return message


def assert_rows_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------
# Equivalence with the in-memory path.


@pytest.mark.parametrize('seq_len, fraction', [(7, 0.2), (32, 0.1), (300, 0.0)])
def test_streamed_rows_equal_the_in_memory_rows(corpus, tok, prepared, seq_len, fraction):
  manifest = shards.read_manifest(prepared)
  assert manifest['complete'] and len(manifest['shards']) >= 3
  tokenizer = tokenizer_lib.Tokenizer.load(tok)
  train_docs, val_docs = data.split_documents(data.load_corpus(str(corpus)), fraction, seed=0)
  assert len(train_docs) + len(val_docs) == manifest['num_documents'] == 4 + 15 + 5 + 12
  opened = shards.open_training_data(str(prepared), fraction, seq_len, split_seed=0)
  for rows, docs in ((opened.train, train_docs), (opened.validation, val_docs)):
    packed = data.pack_documents(tokenizer, docs, seq_len)
    assert (rows.num_rows, rows.num_tokens) == (packed.num_rows, packed.num_tokens)
    assert_rows_equal(rows.rows(slice(None)), packed.rows(slice(None)))
    picks = np.array([3, 0, 3]) % max(packed.num_rows, 1) if packed.num_rows else []
    assert_rows_equal(rows.rows(np.asarray(picks, int)), packed.rows(np.asarray(picks, int)))
  packed = data.pack_documents(tokenizer, train_docs, seq_len)
  memory = data.make_train_iterator(packed, 4, seed=7)
  streamed = data.make_train_iterator(opened.train, 4, seed=7)
  for _ in range(3 * packed.num_rows // 4 + 1):  # past an epoch boundary
    assert_rows_equal(next(streamed), next(memory))
  assert shards.unigram_entropy(opened.train, 400) == pytest.approx(
      shards.unigram_entropy(packed, 400), abs=1e-12)


class RecordingRows(shards.ShardedRows):
  """ShardedRows that remember which rows were read."""

  def rows(self, index):
    self.read = getattr(self, 'read', []) + np.asarray(index).reshape(-1).tolist()
    return super().rows(index)


def test_two_processes_read_disjoint_rows_covering_all(prepared):
  train = shards.open_training_data(str(prepared), 0.1, 16, split_seed=0).train
  hosts = [RecordingRows(train.source, train.doc_ids, 16) for _ in range(2)]
  batches = [list(data.make_train_iterator(rows, 1, seed=3, num_epochs=1, process_index=i,
                                           process_count=2)) for i, rows in enumerate(hosts)]
  n = train.num_rows
  assert [len(h.read) for h in hosts] == [-(-n // 2), n // 2]
  assert set(hosts[0].read).isdisjoint(hosts[1].read)  # each reads only its own rows
  assert sorted(hosts[0].read + hosts[1].read) == list(range(n))  # all of them, once
  key = lambda t, s: bytes(t) + bytes(s)
  got = sorted(key(b['tokens'][0], b['segment_ids'][0]) for bs in batches for b in bs)
  everything = train.rows(slice(None))
  assert got == sorted(map(key, everything['tokens'], everything['segment_ids']))


# ----------------------------------------------------------------------------
# Preparation: resume after kill -9, refusals.


def test_kill_during_preparation_then_rerun_gives_identical_shards(corpus, tok, prepared,
                                                                   tmp_path):
  out = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'experiments.prepare_data', f'--corpus={corpus}',
         f'--tokenizer={tok}', f'--out={out}', '--workers=2', f'--unit_mb={1500 / 2**20!r}']
  killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PREPARE_DATA_KILL_AFTER='1'),
                          start_new_session=True)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  manifest = shards.read_manifest(out)
  total = len(manifest['units'])
  assert not manifest['complete'] and 1 <= len(manifest['shards']) < total
  one_line_error(lambda: shards.open_source(out), 'manifest.json', 'incomplete')
  (out / 'shard-00009.tokens.tmp999').write_bytes(b'half a shard')  # a dead writer's
  prepare_data.prepare(str(corpus), out, tokenizer=str(tok), unit_bytes=1500)
  assert file_hashes(out) == file_hashes(prepared)
  assert shards.read_manifest(out)['shards'] == shards.read_manifest(prepared)['shards']
  assert not list(out.glob('*.tmp*'))


def test_changed_corpus_or_tokenizer_is_refused_not_mixed(corpus, tok, tmp_path):
  source = write_corpus(tmp_path / 'c2', seed=5)
  out = tmp_path / 'out'
  prepare_data.prepare(str(source), out, tokenizer=str(tok), unit_bytes=1500)
  before = snapshot(out)
  (source / '00.txt').write_text('Changed.\n', encoding='utf-8')
  one_line_error(lambda: prepare_data.prepare(str(source), out, tokenizer=str(tok),
                                              unit_bytes=1500),
                 'manifest.json', '00.txt', 'corpus changed', error=common.UserError)
  other = tokenizer_lib.train_tokenizer(['other words entirely ' * 200], vocab_size=390)
  other.save(tmp_path / 'other.model')
  one_line_error(lambda: prepare_data.prepare(str(source), out,
                                              tokenizer=str(tmp_path / 'other.model')),
                 'tokenizer.model', error=common.UserError)
  assert snapshot(out) == before


# ----------------------------------------------------------------------------
# Mixtures.


@pytest.fixture(scope='module')
def second(tok, tmp_path_factory):
  root = tmp_path_factory.mktemp('second')
  write_corpus(root / 'c', seed=9, files=6, words=[w.upper() for w in WORDS])
  prepare_data.prepare(str(root / 'c'), root / 'out', tokenizer=str(tok))
  return root / 'out'


def test_mixture_is_deterministic_and_exact(prepared, second):
  spec = f'{prepared}:0.7,{second}:0.3'
  opened = shards.open_training_data(spec, 0.1, 16, split_seed=0)
  mix = opened.train
  assert isinstance(mix, shards.Mixture) and mix.names == ['main', 'out']
  slots, rank, per_period = shards.mixture_schedule([0.7, 0.3], seed=4)
  assert list(per_period) == [7000, 3000] and sorted(rank[slots == 1]) == list(range(3000))
  rows_of = [{bytes(r) for r in src.rows(slice(None))['tokens']} for src in mix.sources]
  batches = [next(it) for it in [data.make_train_iterator(mix, 8, seed=4)] for _ in range(25)]
  again = data.make_train_iterator(mix, 8, seed=4)
  for b in batches:
    assert_rows_equal(b, next(again))
  drawn_rows = [bytes(r) for b in batches for r in b['tokens']]
  assert all(r in rows_of[s] for r, s in zip(drawn_rows, slots[:200]))  # the schedule, row by row
  assert sum(r in rows_of[0] and r in rows_of[1] for r in drawn_rows) <= 2  # (each last row)
  drawn = mix.tokens_drawn(200, seed=4)
  assert drawn == {'main': int((slots[:200] == 0).sum()) * 16,
                   'out': int((slots[:200] == 1).sum()) * 16}
  other_seed = [next(it) for it in [data.make_train_iterator(mix, 8, seed=5)] for _ in range(3)]
  assert any((a['tokens'] != b['tokens']).any() for a, b in zip(batches, other_seed))
  # Hosts: two of batch 4 together read the draws of one of batch 8.
  hosts = [data.make_train_iterator(mix, 4, seed=4, process_index=i, process_count=2)
           for i in range(2)]
  for b in batches[:5]:
    parts = [next(h)['tokens'] for h in hosts]
    np.testing.assert_array_equal(np.stack(parts, 1).reshape(8, -1), b['tokens'])
  assert opened.validation.num_rows == sum(
      shards.open_training_data(str(p), 0.1, 16, 0).validation.num_rows
      for p in (prepared, second))


def test_bad_mixtures_are_one_line_errors(prepared, tok, tmp_path):
  for spec in (f'{prepared}:0,{prepared}:0', f'{prepared}:-1,{prepared}:2',
               f'{prepared}:nan'):
    one_line_error(lambda: shards.open_training_data(spec, 0.1, 16, 0), 'data.shards')
  one_line_error(lambda: shards.open_training_data(f'{prepared}:x', 0.1, 16, 0), 'weight')
  # An empty source: a complete preparation with no documents.
  empty = tmp_path / 'empty'
  empty.mkdir()
  tokenizer = tokenizer_lib.Tokenizer.load(tok)
  tokenizer.save(empty / shards.TOKENIZER_FILE)
  (tmp_path / 'blank.txt').write_text(' \n', encoding='utf-8')
  manifest = shards.new_manifest(shards.describe_corpus(str(tmp_path / 'blank.txt')),
                                 tokenizer, 0)
  manifest['shards'] = [shards.write_shard(empty, 0, [' '], tokenizer, 0)]
  manifest['complete'] = True
  shards.write_manifest(empty, manifest)
  one_line_error(lambda: shards.open_training_data(f'{prepared}:0.5,{empty}:0.5', 0.1, 16, 0),
                 empty, 'empty source')
  one_line_error(lambda: shards.open_training_data(str(tmp_path / 'nothing'), 0.1, 16, 0),
                 'nothing', 'no manifest.json')
  one_line_error(lambda: shards.open_training_data(str(prepared), 0.1, 16, split_seed=1),
                 prepared, 'split seed 0')


# ----------------------------------------------------------------------------
# Damaged shards, bad corpora.


@pytest.fixture
def copy(prepared, tmp_path):
  out = tmp_path / 'copy'
  out.mkdir()
  for p in prepared.iterdir():
    (out / p.name).write_bytes(p.read_bytes())
  return out


def test_truncated_shard(copy):
  path = copy / 'shard-00001.tokens'
  path.write_bytes(path.read_bytes()[:-2])
  one_line_error(lambda: shards.open_source(copy), path, 'truncated')


def test_corrupted_shard_fails_on_first_read(copy):
  path = copy / 'shard-00001.tokens'
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x40
  path.write_bytes(bytes(raw))
  rows = shards.open_training_data(str(copy), 0.0, 8, 0).train
  one_line_error(lambda: rows.rows(slice(None)), path, 'corrupted')
  docs = copy / 'shard-00000.docs.npy'
  raw = bytearray(docs.read_bytes())
  raw[-3] ^= 0x01
  docs.write_bytes(bytes(raw))
  one_line_error(lambda: shards.open_source(copy), docs, 'CRC32')


def test_manifest_that_does_not_match_the_shards(copy):
  manifest = shards.read_manifest(copy)
  manifest['shards'][0]['num_tokens'] += 1
  shards.write_manifest(copy, manifest)
  one_line_error(lambda: shards.open_source(copy), 'shard-00000.tokens', 'manifest')
  manifest['shards'][0]['num_tokens'] -= 1
  dropped = manifest['shards'].pop()
  shards.write_manifest(copy, manifest)
  one_line_error(lambda: shards.open_source(copy),
                 shards.shard_file(dropped['index'], ''), 'not in the manifest')


def test_parquet_without_the_text_column(tok, tmp_path):
  folder = tmp_path / 'c'
  folder.mkdir()
  (folder / 'a.txt').write_text('fine text\n', encoding='utf-8')
  pq.write_table(pa.table({'body': ['x', 'y']}), folder / 'b.parquet')
  out = tmp_path / 'out'
  one_line_error(lambda: prepare_data.prepare(str(folder), out, tokenizer=str(tok)),
                 'b.parquet', "no column 'text'", 'body')
  one_line_error(lambda: data.load_corpus(str(folder / 'b.parquet')), 'b.parquet', 'body')
  assert not out.exists()  # nothing written
  # The command line: exit 2, one line naming the file.
  cli = subprocess.run([sys.executable, '-m', 'experiments.prepare_data',
                        f'--corpus={folder}', f'--tokenizer={tok}', f'--out={out}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 2 and 'b.parquet' in cli.stderr, cli.stderr[-2000:]
  assert len(cli.stderr.strip().splitlines()) == 1 and not out.exists()


def test_empty_corpus(tok, tmp_path):
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'a.txt').write_text('  \n', encoding='utf-8')
  one_line_error(lambda: prepare_data.prepare(str(tmp_path / 'c'), tmp_path / 'o',
                                              tokenizer=str(tok)), 'empty corpus')


# ----------------------------------------------------------------------------
# Pretraining on shards.


def pretrain_config(shards_spec, steps=6, **extra):
  from configs import pretrain as pretrain_config_lib  # pylint: disable=g-import-not-at-top
  config = pretrain_config_lib.get_config('tiny')
  for name, value in {
      'data.shards': shards_spec, 'data.seq_len': 16, 'data.batch_size': 4,
      'data.validation_fraction': 0.1, 'tokenizer.vocab_size': 400, 'model.d_model': 16,
      'model.num_layers': 1, 'model.num_heads': 2, 'train.steps': steps,
      'train.log_every': 1, 'train.eval_every': 0, 'train.eval_batches': 1,
      'train.final_eval_batches': 2, 'train.checkpoint_every': 2, 'train.num_samples': 0,
      'optimizer.warmup_steps': 1, **extra}.items():
    if name == 'train.final_eval_batches':
      config.train.final_eval_batches = value
      continue
    common.apply_override(config, name, str(value))
  return config


@pytest.mark.slow
def test_pretraining_on_a_mixture_resumes_exactly(prepared, second, tmp_path):
  """Three short runs of the same programs: the session's compilation cache (conftest)
  makes the second and third cheap."""
  from experiments import loop as loop_lib  # pylint: disable=g-import-not-at-top
  from experiments import pretrain  # pylint: disable=g-import-not-at-top
  spec = f'{prepared}:0.7,{second}:0.3'
  reference = pretrain.train(pretrain_config(spec), tmp_path / 'ref')
  workdir = tmp_path / 'killed'
  with loop_lib.simulate_kill(3), pytest.raises(loop_lib.SimulatedKill):
    pretrain.train(pretrain_config(spec), workdir)
  resumed = pretrain.train(pretrain_config(spec), workdir)
  assert resumed['loop']['resumed_from'] == 2 and resumed['loop']['steps_run'] == 4
  rows = {w: loop_lib.read_metrics(tmp_path / w) for w in ('ref', 'killed')}
  losses = {w: {r['step']: r['train/loss'] for r in rs if 'train/loss' in r}
            for w, rs in rows.items()}
  assert sorted(losses['killed']) == list(range(1, 7))
  assert losses['killed'] == losses['ref']
  counts = [{k: v for r in rs if r['step'] == 6 for k, v in r.items() if 'source_tokens' in k}
            for rs in rows.values()]
  slots, _, _ = shards.mixture_schedule([0.7, 0.3], seed=0)
  assert counts[0] == counts[1] == {  # 6 steps of 4 rows of 16 tokens, by the schedule
      'train/source_tokens/main': 16 * int((slots[:24] == 0).sum()),
      'train/source_tokens/out': 16 * int((slots[:24] == 1).sum())}
  assert resumed['validation'] == reference['validation']
  # Another mixture on resume: refused (one line naming the workdir), unless explicit.
  other = pretrain_config(f'{prepared}:0.5,{second}:0.5', steps=8)
  one_line_error(lambda: pretrain.train(other, workdir), workdir, 'main:0.7',
                 'data.allow_data_change')
