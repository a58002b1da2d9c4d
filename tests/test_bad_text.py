"""Text that is not what it seems, and lengths and empty sets (issue 19, kinds 3 and 4).

Kind 3, one policy for text entering the system (research/tokenizer.py's docstring):
invalid Unicode (a lone surrogate, valid in JSON, not UTF-8) is a one-line error naming
the file and line, or the flag, in every loader and entry point; special-token text in
data and prompts is text, never a reserved id. Kind 4: explicit length rules at `sample`
and `chat`, and no metric over zero items that looks like a number.
"""
import gzip
import json

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from configs import sft as sft_config
from experiments import chat as chat_cli
from experiments import common
from experiments import pretrain
from experiments import sample
from experiments import sft
from research import chat
from research import checkpoint as checkpoint_lib
from research import conversations
from research import data as data_lib
from research import evaluation
from research import model as model_lib
from research import objectives
from research import preferences
from research import sampling
from research import shards
from research import tokenizer as tokenizer_lib
from research.tools import search as search_lib
from tests.test_bad_inputs import _set, cli, snapshot, stages  # noqa: F401 (a fixture)
from tests.test_rlhf import init_params

LONE = '\ud83d'  # the first half of a surrogate pair, alone: JSON writes it "\ud83d"
SPECIAL_TEXT = 'a <mask> b <extra_id_0> c <|user|> d <|end_of_turn|> e'


@pytest.fixture(scope='module')
def tok():
  texts = ['the nation and the people of the union ' * 20, 'war and peace and trade ' * 20]
  return tokenizer_lib.train_tokenizer(texts, 400, seed=0)


def _jsonl(path, records):
  # json.dumps writes a lone surrogate as the escape "\ud83d": valid JSON, valid UTF-8 file.
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


# --------------------------------------------------------------------------------------
# Kind 3: invalid Unicode.


def test_text_problem_finds_a_lone_surrogate_anywhere_in_a_record():
  assert tokenizer_lib.text_problem('plain 🎉 text') is None
  # A JSON surrogate pair decodes to one character (U+1F600): fine.
  paired = json.loads('{"a": [1, null, "ok", {"b": "\\ud83d\\ude00"}]}')
  assert paired['a'][3]['b'] == '😀' and tokenizer_lib.text_problem(paired) is None
  for value in ('ab' + LONE + 'cd', {'messages': [{'content': 'x' + LONE}]}, [LONE],
                {LONE: 'key'}):
    problem = tokenizer_lib.text_problem(value)
    assert 'lone surrogate U+D83D' in problem and '\n' not in problem, value
  # The tokenizer itself names the text instead of sentencepiece's TypeError.
  assert 'at character 2' in tokenizer_lib.text_problem('ab' + LONE)


def test_encoders_refuse_invalid_unicode_with_one_line(tok):
  for encode in (lambda: tok.encode_batch(['ok', 'b' + LONE]),
                 lambda: tok.encode_text_batch(['ok', 'b' + LONE + ' <mask>']),
                 lambda: tok.encode('b' + LONE)):
    with pytest.raises(tokenizer_lib.TextError, match='lone surrogate U\\+D83D'):
      encode()
  with pytest.raises(tokenizer_lib.TextError, match='train_tokenizer: invalid Unicode'):
    tokenizer_lib.train_tokenizer(['fine text ' * 50, 'x' + LONE], 400)


def test_every_jsonl_loader_names_file_and_line(tmp_path, tok):
  """Pretraining JSONL (in memory and streamed for shards), SFT conversations, GSM8K-style
  lines, preference pairs, hh-rlhf lines and the search corpus: file:LINE: invalid Unicode."""
  corpus = _jsonl(tmp_path / 'c.jsonl', [{'text': 'fine'}, {'text': 'bad ' + LONE}])
  with pytest.raises(data_lib.DataError, match=r'c\.jsonl:2: invalid Unicode'):
    data_lib.load_corpus(str(corpus))
  with pytest.raises(data_lib.DataError, match=r'c\.jsonl:2: invalid Unicode'):
    list(data_lib.iter_file_documents(corpus, data_lib.KIND_JSONL))  # what shards read
  convs = _jsonl(tmp_path / 'convs.jsonl', [
      {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]},
      {'messages': [{'role': 'user', 'content': 'hi' + LONE},
                    {'role': 'assistant', 'content': 'yo'}]}])
  with pytest.raises(conversations.ConversationError, match=r'convs\.jsonl:2: invalid Unicode'):
    conversations.jsonl(convs)
  kept, problems = conversations.jsonl(convs, on_error='skip')
  assert len(kept) == 1 and 'convs.jsonl:2: invalid Unicode' in problems[0]
  pairs = _jsonl(tmp_path / 'pairs.jsonl', [
      {'prompt': 'q', 'chosen': 'good', 'rejected': 'bad'},
      {'prompt': 'q', 'chosen': 'good' + LONE, 'rejected': 'bad'}])
  with pytest.raises(preferences.PreferenceError, match=r'pairs\.jsonl:2: invalid Unicode'):
    preferences.jsonl_pairs(pairs)
  hh = tmp_path / 'hh.jsonl.gz'
  hh.write_bytes(gzip.compress(json.dumps(
      {'chosen': '\n\nHuman: hi' + LONE + '\n\nAssistant: a', 'rejected': '\n\nHuman: hi\n\n'
       'Assistant: b'}).encode()))
  with pytest.raises(preferences.PreferenceError, match=r'hh\.jsonl\.gz:1: invalid Unicode'):
    preferences.hh_rlhf(hh)
  (tmp_path / 'gsm8k').mkdir()
  _jsonl(tmp_path / 'gsm8k' / 'train.jsonl', [{'question': 'q' + LONE, 'answer': 'x #### 3'}])
  with pytest.raises(conversations.ConversationError, match=r'train\.jsonl:1: invalid Unicode'):
    conversations.gsm8k(tmp_path / 'gsm8k')
  search = _jsonl(tmp_path / 'search.jsonl', [{'title': 't', 'text': 'x' + LONE}])
  with pytest.raises(ValueError, match=r'search\.jsonl:1: invalid Unicode'):
    search_lib.corpus_documents(str(search))


def test_pretrain_with_a_lone_surrogate_names_the_line_and_writes_nothing(tmp_path):
  corpus = _jsonl(tmp_path / 'corpus.jsonl',
                  [{'text': f'document {i} about the union'} for i in range(5)]
                  + [{'text': 'emoji ' + LONE}])
  config = _set(pretrain_config.get_config('tiny'), data__corpus=corpus)
  with pytest.raises(data_lib.DataError, match=r'corpus\.jsonl:6: invalid Unicode'):
    pretrain.train(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_sft_with_a_lone_surrogate_names_the_line_and_writes_nothing(stages, tmp_path):
  convs = _jsonl(tmp_path / 'convs.jsonl', [
      {'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': 'a'}]}
      for i in range(4)] + [{'messages': [{'role': 'user', 'content': LONE},
                                          {'role': 'assistant', 'content': 'a'}]}])
  config = sft_config.get_config('test')
  for source in config.data.weights:
    config.data.weights[source] = 0.0
  config = _set(config, data__weights__jsonl=1.0, data__jsonl_path=convs, data__seq_len=32)
  with pytest.raises(conversations.ConversationError, match=r'convs\.jsonl:5: invalid Unicode'):
    sft.finetune(config, tmp_path / 'sft', stages['lm'])
  assert not (tmp_path / 'sft').exists()


@pytest.mark.slow
def test_sample_and_chat_flags_with_undecodable_bytes_are_one_line(stages):
  """Bytes that are not UTF-8 in argv arrive as lone surrogates (surrogateescape)."""
  before = snapshot(stages['lm'])
  code, lines = cli('experiments.sample', f'--workdir={stages["lm"]}', '--prompt=ok',
                    '--prompt=caf\udce9')  # b'caf\xe9': Latin-1, not UTF-8
  assert code == 2 and len(lines) <= 3 and '--prompt 2: invalid Unicode' in lines[-1], lines
  code, lines = cli('experiments.chat', f'--workdir={stages["lm"]}', '--system=\udce9')
  assert code == 2 and len(lines) <= 3 and '--system: invalid Unicode' in lines[-1], lines
  assert snapshot(stages['lm']) == before


def test_chat_session_refuses_invalid_text_and_keeps_its_history(stages):
  session = chat_cli.load_session(stages['lm'], max_new_tokens=4)
  with pytest.raises(chat_cli.UserError, match='message: invalid Unicode'):
    session.reply('hello ' + LONE)
  assert session.messages == []
  written = []
  reads = iter(['x' + LONE, '/quit'])
  chat_cli.interactive(session, read=lambda _: next(reads), write=written.append)
  assert any('error: message: invalid Unicode' in w for w in written), written


# --------------------------------------------------------------------------------------
# Kind 3: special-token text in data and prompts is text.


def test_special_token_text_in_a_corpus_is_text_in_memory_and_in_shards(tmp_path, tok):
  docs = [data_lib.Document(SPECIAL_TEXT), data_lib.Document('the union <extra_id_99>')]
  packed = data_lib.pack_documents(tok, docs, 16)
  real = packed.tokens[packed.segment_ids > 0]
  # Only the eos that ends each document is reserved; the literal pieces are byte pieces.
  assert set(real[tokenizer_lib.is_special(real)].tolist()) == {tok.eos_id}
  ids = tok.encode_text_batch([d.text for d in docs])
  assert [tok.decode(i) for i in ids] == [d.text for d in docs]
  assert ids == [tok.encode_text(d.text) for d in docs]
  # Shards (experiments.prepare_data) encode the same way: the same rows.
  folder = tmp_path / 'shards'
  folder.mkdir()
  record = shards.write_shard(folder, 0, [d.text for d in docs], tok, split_seed=0)
  flat = np.fromfile(folder / shards.shard_file(0, 'tokens'), shards.token_dtype(400))
  assert flat.tolist() == [t for i in ids for t in i + [tok.eos_id]]
  assert record['num_tokens'] == len(flat)


def test_prepare_data_encodes_special_text_as_text_and_refuses_old_shards(tmp_path, tok):
  """experiments.prepare_data: the same rows as in memory; shards prepared before the
  policy that hold reserved ids are refused (one line), and a lone surrogate names its
  file and line with nothing left half-written."""
  from experiments import prepare_data  # pylint: disable=g-import-not-at-top
  tok_file = tmp_path / 'tokenizer.model'
  tok.save(tok_file)
  corpus = _jsonl(tmp_path / 'c.jsonl', [{'text': SPECIAL_TEXT}, {'text': 'the union'}])
  out = tmp_path / 'shards'
  prepare_data.prepare(str(corpus), out, tokenizer=str(tok_file))
  source = shards.open_source(out)
  assert not tokenizer_lib.is_special(source.counts.nonzero()[0][
      source.counts.nonzero()[0] != tok.eos_id]).any()
  manifest = json.loads((out / shards.MANIFEST_FILE).read_text())
  assert manifest['special_text'] == 'text'
  # The same folder as an older preparation would have made it: reserved ids inside.
  del manifest['special_text']
  (out / shards.MANIFEST_FILE).write_text(json.dumps(manifest))
  open_source_of = lambda: shards.open_source(out)
  assert open_source_of().counts.sum() == source.counts.sum()  # no reserved id: still fine
  counts_file = out / shards.shard_file(0, 'counts.npy')
  counts = np.load(counts_file)
  counts[tok.mask_id] += 1
  np.save(counts_file, counts)
  record = manifest['shards'][0]
  record['counts_crc32'] = shards.file_crc32(counts_file)
  (out / shards.MANIFEST_FILE).write_text(json.dumps(manifest))
  with pytest.raises(data_lib.DataError, match='prepared before special-token text'):
    open_source_of()
  bad = _jsonl(tmp_path / 'bad.jsonl', [{'text': 'fine'}, {'text': LONE}])
  with pytest.raises(data_lib.DataError, match=r'bad\.jsonl:2: invalid Unicode'):
    prepare_data.prepare(str(bad), tmp_path / 'bad_shards', tokenizer=str(tok_file))
  assert not (tmp_path / 'bad_shards').exists()  # this call made it: removed


def test_objectives_still_place_their_own_reserved_ids(tok):
  """The masked objective's <mask> lands only where it scores; a literal "<mask>" in the
  text is not one (with the old encoding it was: an unscored mask in the input)."""
  docs = [data_lib.Document(' '.join([SPECIAL_TEXT] * 4))]
  packed = data_lib.pack_documents(tok, docs, 64)
  ids = objectives.SpecialIds.from_tokenizer(tok)
  ex = objectives.get_objective('masked')(packed.rows(slice(None)), jax.random.key(0), ids)
  inputs, weights = np.asarray(ex['inputs']), np.asarray(ex['weights'])
  assert (inputs == tok.mask_id).any()
  assert np.all(weights[inputs == tok.mask_id] > 0)


def test_sample_prompts_are_text_and_fill_reads_only_mask(tok):
  prompt, lengths = sampling.encode_prompts(tok, [SPECIAL_TEXT])
  assert not tokenizer_lib.is_special(prompt[0, :lengths[0]]).any()
  ids = sample.fill_ids(tok, 'the <mask> of <extra_id_0> and <|user|>')
  assert ids.count(tok.mask_id) == 1 and sum(tokenizer_lib.is_special(np.asarray(ids))) == 1
  assert tok.decode(ids) == 'the <mask> of <extra_id_0> and <|user|>'


def test_a_folder_of_jsonl_is_read_by_the_in_memory_path(tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  _jsonl(folder / 'a.jsonl', [{'text': 'first'}, {'text': 'second'}])
  (folder / 'b.jsonl.gz').write_bytes(gzip.compress(b'{"text": "third"}\n'))
  (folder / 'c.txt').write_text('fourth')
  (folder / 'ignored.md').write_text('not a corpus file')
  docs = data_lib.load_corpus(str(folder))
  assert [d.text for d in docs] == ['first', 'second', 'third', 'fourth']
  assert docs[1].meta['line'] == 2
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.md').write_text('x')
  with pytest.raises(data_lib.DataError, match='no .txt, .jsonl, .jsonl.gz or .parquet'):
    data_lib.load_corpus(str(empty))


# --------------------------------------------------------------------------------------
# Kind 4: lengths.


@pytest.fixture(scope='module')
def learned_stage(tmp_path_factory, tok):
  """A stage with learned positions (max_len 32)."""
  workdir = tmp_path_factory.mktemp('learned') / 'lm'
  workdir.mkdir()
  config = _set(pretrain_config.get_config('tiny'), tokenizer__vocab_size=400,
                model__d_model=16, model__num_layers=1, model__num_heads=2,
                data__seq_len=32, model__position='learned').to_dict()
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  checkpoint_lib.write_json_atomic(workdir / checkpoint_lib.CONFIG_FILE, config)
  tok.save(workdir / checkpoint_lib.TOKENIZER_FILE)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  ckpt.save(1, {'params': init_params(cfg)}, None,
            {'step': 1, 'tokenizer_fingerprint': tok.fingerprint})
  ckpt.close()
  return workdir


def test_sample_refuses_a_prompt_past_the_context(stages, learned_stage):
  """RoPE (the `stages` lm) and learned positions alike: P + N - 1 <= max_len (32)."""
  for workdir in (stages['lm'], learned_stage):
    long = 'the nation and the people ' * 20
    with pytest.raises(sample.UserError, match=r'--prompt 2 is \d+ tokens: with '
                       r'--max_new_tokens=8 it needs \d+ positions, the model has 32'):
      sample.run(workdir, ['short', long], [], max_new_tokens=8, log=lambda s: None)
    with pytest.raises(sample.UserError, match='--max_new_tokens=40 it needs'):
      sample.run(workdir, ['the'], [], max_new_tokens=40, log=lambda s: None)
    with pytest.raises(sample.UserError, match=r'--fill 1 is \d+ tokens, the model has 32'):
      sample.run(workdir, [], [long + ' <mask>'], log=lambda s: None)
  # At the limit it samples: P prompt tokens + (33 - P) new tokens - 1 = 32 positions.
  n = len(tokenizer_lib.Tokenizer.load(learned_stage / 'tokenizer.model').encode_text('the'))
  out = sample.run(learned_stage, ['the'], [], max_new_tokens=33 - n, temperature=0.0,
                   log=lambda s: None)
  assert len(out['samples']) == 1
  with pytest.raises(sample.UserError, match='it needs 33 positions'):
    sample.run(learned_stage, ['the'], [], max_new_tokens=34 - n, log=lambda s: None)


@pytest.mark.slow
def test_sample_long_prompt_on_the_command_line_is_one_line(stages):
  before = snapshot(stages['lm'])
  code, lines = cli('experiments.sample', f'--workdir={stages["lm"]}',
                    '--prompt=' + 'the nation ' * 40)
  assert code == 2 and len(lines) <= 3, lines
  assert 'model.max_len' in lines[-1] and 'positions' in lines[-1], lines
  assert snapshot(stages['lm']) == before


def _turn(q, a):
  return [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]


def test_chat_drops_whole_turns_keeps_the_system_if_it_fits_and_refuses_too_long(stages, tok):
  session = chat_cli.load_session(stages['lm'], max_new_tokens=4)  # a 28-token prompt budget
  budget = session.cfg.max_len - session.max_new_tokens
  user, assistant, system = (tok.chat_ids[k] for k in ('user', 'assistant', 'system'))
  # History dropped from the oldest, in whole turns: what is kept renders exactly as the
  # system message + the last turns, and starts at a user header.
  session.messages = ([{'role': 'system', 'content': 'be brief'}] + _turn('one', 'uno')
                      + _turn('two', 'dos') + _turn('three', 'tres')
                      + [{'role': 'user', 'content': 'four'}])
  ids = session._prompt_ids()  # pylint: disable=protected-access
  assert len(ids) <= budget and ids[0] == system and ids[-1] == assistant
  kept = chat.parse(tok, ids[:-1])
  assert kept[0]['content'] == 'be brief' and kept[-1] == {'role': 'user', 'content': 'four'}
  assert kept[1:] == session.messages[len(session.messages) - len(kept) + 1:]
  assert len(kept) < len(session.messages) and kept[1]['role'] == 'user'
  # A question that fits only without the system message: the system is dropped, the
  # question kept whole, with its header.
  question = 'the nation and ' * 3
  alone = len(chat.render(tok, [{'role': 'user', 'content': question}],
                          add_generation_prompt=True).ids)
  system_text = 'the people ' * 2
  assert alone <= budget < alone + len(chat.render(
      tok, [{'role': 'system', 'content': system_text}]).ids)
  session.messages = [{'role': 'system', 'content': system_text},
                      {'role': 'user', 'content': question}]
  ids = session._prompt_ids()  # pylint: disable=protected-access
  assert ids[0] == user and ids[-1] == assistant
  assert chat.parse(tok, ids[:-1]) == [{'role': 'user', 'content': question}]
  # One message too long even alone: a clear error, the history left as it was.
  session.reset()
  with pytest.raises(chat_cli.UserError, match=r'message too long: \d+ tokens with its '
                     r'headers, the model.s 32-token context leaves 28'):
    session.reply('the nation and the people ' * 10)
  assert session.messages == []


@pytest.mark.slow
def test_chat_prompt_too_long_on_the_command_line_is_one_line(stages):
  code, lines = cli('experiments.chat', f'--workdir={stages["lm"]}', '--max_new_tokens=4',
                    '--prompt=' + 'the nation and the people ' * 10)
  assert code == 2 and len(lines) <= 3 and 'message too long' in lines[-1], lines


# --------------------------------------------------------------------------------------
# Kind 4: metrics over zero items.


def test_metrics_over_zero_items_are_none(tmp_path):
  no_batches = evaluation.heldout_losses(lambda *a: {}, None, iter([]))
  assert no_batches == {'objective_loss': None, 'causal_loss': None}
  assert evaluation.accuracy_summary([]) == dict(correct=0, total=0, accuracy=None,
                                                 interval=None)
  summary = evaluation.accuracy_summary([True, False, True, True])
  assert summary['accuracy'] == 0.75 and summary['interval'][0] < 0.75 < summary['interval'][1]
  writer = common.MetricWriter(tmp_path)
  writer.write(3, {'objective_loss': None, 'causal_loss': None}, prefix='eval/')
  writer.write(4, {'objective_loss': None, 'loss': 1.5}, prefix='eval/')
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows == [{'step': 4, 'eval/loss': 1.5}]


def test_reports_show_a_dash_for_missing_numbers():
  from experiments import sft_report  # pylint: disable=g-import-not-at-top
  main = dict(format='plain', minutes=1.0, packing={}, train=dict(step=2),
              eval=dict(heldout_assistant_loss={'jsonl': None, 'chatterbot': 1.25},
                        gsm8k=evaluation.accuracy_summary([]), chat=[]))
  text = sft_report.report(main, None, dict(init='x', data=dict(batch_size=2, seq_len=8)))
  assert '| jsonl | – |' in text and '| chatterbot | 1.250 |' in text
  assert 'GSM8K test: no problems' in text


@pytest.mark.slow
def test_pretraining_without_a_validation_split_reports_null(tmp_path, capsys):
  from tests.test_pretrain import write_corpus  # pylint: disable=g-import-not-at-top
  corpus = write_corpus(tmp_path / 'corpus', docs=8)
  config = _set(pretrain_config.get_config('tiny'), data__corpus=corpus, data__seq_len=32,
                data__batch_size=4, tokenizer__vocab_size=512, model__d_model=16,
                model__num_layers=1, model__num_heads=2, train__steps=2, train__eval_every=1,
                train__num_samples=0, data__validation_fraction=0.0)
  summary = pretrain.train(config, tmp_path / 'w')
  assert summary['validation'] == {'objective_loss': None, 'causal_loss': None}
  saved = json.loads((tmp_path / 'w' / 'summary.json').read_text())
  assert saved['validation'] == {'objective_loss': None, 'causal_loss': None}
  rows = (tmp_path / 'w' / 'metrics.jsonl').read_text()
  assert 'eval/' not in rows and 'train/loss' in rows
  assert capsys.readouterr().out.count('no validation split') == 1
  from experiments import pipeline_report  # pylint: disable=g-import-not-at-top
  assert pipeline_report._f(saved['validation']['causal_loss']) == '–'  # pylint: disable=protected-access


def test_studies_refuse_to_run_without_a_validation_split(tmp_path):
  """compare_objectives and the scaling sweep compare held-out losses: with no held-out
  document (a one-document corpus) they stop before writing, not report 0.0 or null."""
  from configs import compare_objectives as co_config  # pylint: disable=g-import-not-at-top
  from configs import scaling as scaling_config  # pylint: disable=g-import-not-at-top
  from experiments import compare_objectives, scaling  # pylint: disable=g-import-not-at-top
  assert evaluation.causal_loss(None, None, []) is None  # no token scored: no number
  one = tmp_path / 'one.txt'
  one.write_text('a single short document about the union\n')
  config = co_config.get_config()
  config.pretrain.data.corpus = str(one)
  with pytest.raises(common.UserError, match='holds out none of 1 documents'):
    compare_objectives.prepare_study(config, tmp_path / 'co')
  config = scaling_config.get_config('test')
  config.base.data.corpus = str(one)
  with pytest.raises(common.UserError, match='holds out none of 1 documents'):
    scaling.prepare_corpus(config, tmp_path / 'sc')
  assert not (tmp_path / 'co').exists() and not (tmp_path / 'sc').exists()
