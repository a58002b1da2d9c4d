"""Supervised fine-tuning: a pretrained document completer -> a chat model.

  python -m experiments.sft --config=configs/sft.py --init=runs/pretrain --workdir=runs/sft

Starts from the init workdir's params, config and tokenizer (the Orbax handoff), trains
on a weighted mix of conversations with the loss on assistant tokens only (the same
jitted sharded train step, checkpoints and resume as pretraining), then evaluates:
held-out assistant-token loss per source, exact match on held-out synthetic word
problems by number of steps k, GSM8K test exact match, and a few chat replies. With
`eval.format_twin` it also trains the answer-first twin (same data and budget, answers
written before the working) in `WORKDIR/answer_first`, for the "tokens to think" table.
Writes `eval.json` and `report.md` to the workdir; later stages (reward model, PPO, chat)
start from it.
"""
import collections
import hashlib
import json
import pathlib
import time

import jax
from experiments import common
from experiments import loop as loop_lib
from experiments import sft_report
from research import chat
from research import checkpoint as checkpoint_lib
from research import conversations as conv_lib
from research import data as data_lib
from research import evaluation
from research import model as model_lib
from research import objectives as objectives_lib
from research import sampling
from research import sharding as sharding_lib
from research.tools import data as tools_data
from research.tools import evaluation as tools_eval
from research.tools import registry as tools_registry
from research.tools import search as search_lib

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'


def _split(items, fraction, seed):
  """Deterministic split by a seeded hash of each item's JSON (no item in both halves)."""
  keyed = sorted(range(len(items)), key=lambda i: (hash_of(items[i], seed), i))
  n_val = min(max(round(fraction * len(items)), 1), len(items) - 1) if len(items) > 1 else 0
  held = set(keyed[:n_val])
  return ([x for i, x in enumerate(items) if i not in held],
          [x for i, x in enumerate(items) if i in held])


def hash_of(item, seed) -> str:
  return hashlib.sha256(f'{seed}\0{json.dumps(item, sort_keys=True)}'.encode()).hexdigest()


SKIPPED_SHOWN = 5  # skipped JSONL lines printed one by one; the rest counted


def load_sources(config: dict) -> tuple[dict, dict, dict]:
  """(train conversations by source, held-out ones by source, evaluation problems)."""
  dc, seed = config['data'], config['seed']
  weights = {k: v for k, v in dc['weights'].items() if v > 0}
  train, held, problems = {}, {}, {}
  wp = dc['word_problems']
  # Calculator data opens with a system message declaring the tool (plain word problems
  # have none), so the model calls it only when told it is there.
  system = tools_data.calculator_system() if dc.get('tools_in_system') else None
  if {'word_problems', 'calculator'} & set(weights) or config['eval']['word_problems_per_k']:
    # Stratified by k: the same number of train and of test problems for every k.
    ks = range(wp['min_steps'], wp['max_steps'] + 1)
    per_k = config['eval']['word_problems_per_k']
    train_p, test_p = [], []
    for k in ks:
      tr, te = conv_lib.word_problem_splits(wp['num_train'] // len(ks), per_k, steps=(k, k),
                                            seed=seed * 1000 + k)
      train_p += tr
      test_p += te
    problems['word_problems'] = test_p
    if 'word_problems' in weights:
      train['word_problems'] = [conv_lib.word_problem_conversation(p, wp['format'])
                                for p in train_p]
      held['word_problems'] = [conv_lib.word_problem_conversation(p, wp['format'])
                               for p in test_p]
    if 'calculator' in weights:  # the same problems, each step handed to the calculator
      train['calculator'] = [tools_data.calculator_conversation(p, system) for p in train_p]
      held['calculator'] = [tools_data.calculator_conversation(p, system) for p in test_p]
  if 'chatterbot' in weights:
    train['chatterbot'], held['chatterbot'] = _split(conv_lib.chatterbot(),
                                                     dc['validation_fraction'], seed)
  gsm_dir = pathlib.Path(dc['gsm8k_dir']) if dc['gsm8k_dir'] else SHARED_DATA / 'gsm8k'
  if gsm_dir.is_dir():
    if 'gsm8k' in weights:
      gsm_train = conv_lib.gsm8k(gsm_dir, 'train')
      train['gsm8k'], held['gsm8k'] = _split([e.conversation for e in gsm_train],
                                             dc['validation_fraction'], seed)
    if 'gsm8k_tools' in weights:  # <<a*b=c>> annotations as calculator calls
      gsm_tools = tools_data.gsm8k_tool_examples(gsm_dir, 'train')
      train['gsm8k_tools'], held['gsm8k_tools'] = _split(
          [tools_data.with_system(e.conversation, system) for e in gsm_tools],
          dc['validation_fraction'], seed)
    if config['eval']['gsm8k']:
      problems['gsm8k'] = conv_lib.gsm8k(gsm_dir, 'test')[:config['eval']['gsm8k']]
  elif dc['gsm8k_dir']:
    raise common.UserError(f'data.gsm8k_dir={dc["gsm8k_dir"]}: no such folder')
  if 'jsonl' in weights:
    if not dc['jsonl_path']:
      raise common.UserError('data.weights.jsonl > 0 needs data.jsonl_path')
    convs, skipped = conv_lib.jsonl(dc['jsonl_path'], on_error=dc['on_error'])
    read = (f'{len(convs) + len(skipped)} non-blank lines, {len(skipped)} skipped'
            + (f' (first: {skipped[0]})' if skipped else ''))
    if not convs:
      raise common.UserError(f'data.jsonl_path={dc["jsonl_path"]}: no conversations ({read})')
    common.log(f'data.jsonl_path: {len(convs)} conversations of {read}')
    for p in skipped[1:SKIPPED_SHOWN]:
      common.log(f'skipped: {p}')
    if len(skipped) > SKIPPED_SHOWN:
      common.log(f'skipped: {len(skipped) - SKIPPED_SHOWN} more lines (data.on_error=skip)')
    train['jsonl'], held['jsonl'] = _split(convs, dc['validation_fraction'], seed)
  if 'search' in weights:
    try:
      index = search_lib.corpus_index(dc['search_corpus'])
      convs = tools_data.search_questions(index, dc['search_questions'], seed=seed)
    except ValueError as e:
      raise common.UserError(f'data.search_corpus={dc["search_corpus"]}: {e}') from None
    train['search'], held['search'] = _split(convs, dc['validation_fraction'], seed)
    if config['eval']['tools']:
      problems['search'] = held['search']
  missing = [k for k in weights if k not in train]
  if missing:
    common.log(f'sources with weight but no data here (skipped): {missing}')
  if not train:
    raise common.UserError('no conversation source has data: check data.weights')
  return train, held, problems


def pack(tokenizer, convs, seq_len):
  """Conversations -> packed rows with the assistant loss mask, and packing stats."""
  return chat.pack_conversations([chat.render(tokenizer, c) for c in convs], seq_len)


def make_setup(config: dict, init_config: dict, tokenizer, train, held):
  dc = config['data']
  weights = {k: dc['weights'][k] for k in train}
  mixed = conv_lib.mix(train, weights, dc['num_train'], seed=config['seed'])
  train_rows, stats = pack(tokenizer, [c for _, c in mixed], dc['seq_len'])
  val_rows, _ = pack(tokenizer, [c for convs in held.values() for c in convs], dc['seq_len'])
  common.log(f'sft data: {dict(collections.Counter(s for s, _ in mixed))} conversations '
             f'-> {train_rows.num_rows} rows of {dc["seq_len"]} ({stats})')
  model_cfg = model_lib.TransformerConfig.from_dict(init_config['model'])
  return loop_lib.LMSetup(config=config, model_cfg=model_cfg, tokenizer=tokenizer,
                          train_rows=train_rows, validation_rows=val_rows), stats


def answer_accuracy(params, cfg, tokenizer, items, ec) -> list[bool]:
  """Greedy replies to each (question conversation, gold answer) -> exact match list."""
  prompts = [chat.render(tokenizer, conv, add_generation_prompt=True).ids for conv, _ in items]
  outs = sampling.complete(params, cfg, prompts, max_new_tokens=ec['max_new_tokens'],
                           eos_id=tokenizer.chat_ids['end_of_turn'],
                           batch_size=ec['batch_size'])
  return [conv_lib.final_number(tokenizer.decode(o)) == str(gold)
          for o, (_, gold) in zip(outs, items)]


def heldout_losses(params, cfg, tokenizer, held: dict, seq_len: int, batch_size: int) -> dict:
  """Mean loss on the assistant tokens of each source's held-out conversations."""
  ids = objectives_lib.SpecialIds.from_tokenizer(tokenizer)
  eval_fn = evaluation.make_heldout_loss_fn(model_lib.Transformer(cfg),
                                            objectives_lib.get_objective('supervised'), ids)
  out = {}
  for source, convs in held.items():
    rows, _ = pack(tokenizer, convs, seq_len)
    out[source] = evaluation.heldout_losses(
        eval_fn, params, data_lib.eval_batches(rows, batch_size))['objective_loss']
  return out


def majority_answer_share(problems) -> dict:
  """Per k, the accuracy of always answering that k's most common answer: the floor a
  model that ignores the question can reach."""
  answers = collections.defaultdict(list)
  for p in problems:
    answers[p.k].append(p.answer)
  return {int(k): collections.Counter(v).most_common(1)[0][1] / len(v)
          for k, v in answers.items()}


def evaluate(params, cfg, tokenizer, config, held, problems) -> dict:
  ec = config['eval']
  out = {'heldout_assistant_loss': heldout_losses(params, cfg, tokenizer, held,
                                                  config['data']['seq_len'],
                                                  config['data']['batch_size'])}
  if 'word_problems' in problems:
    test = problems['word_problems']
    items = [([{'role': 'user', 'content': p.question}], p.answer) for p in test]
    correct = answer_accuracy(params, cfg, tokenizer, items, ec)
    by_k = collections.defaultdict(list)
    for p, c in zip(test, correct):
      by_k[p.k].append(c)
    out['word_problems_by_k'] = {int(k): evaluation.accuracy_summary(v)
                                 for k, v in sorted(by_k.items())}
    for k, share in majority_answer_share(test).items():
      out['word_problems_by_k'][k]['majority_answer'] = share
  if 'gsm8k' in problems:
    items = [(e.conversation[:1], e.answer) for e in problems['gsm8k']]
    correct = answer_accuracy(params, cfg, tokenizer, items, ec)
    out['gsm8k'] = evaluation.accuracy_summary(correct)  # accuracy None on 0 problems
  if ec['tools']:
    tools = tools_registry.default_tools(search_lib.corpus_index(config['data']['search_corpus']))
    out['tools'] = tools_eval.evaluate_tools(params, cfg, tokenizer, problems, tools,
                                             max_new_tokens=ec['tools_max_new_tokens'],
                                             batch_size=ec['batch_size'])
  prompts = [chat.render(tokenizer, [{'role': 'user', 'content': q}],
                         add_generation_prompt=True).ids for q in ec['chat_prompts']]
  replies = sampling.complete(params, cfg, prompts, max_new_tokens=ec['max_new_tokens'],
                              eos_id=tokenizer.chat_ids['end_of_turn'], batch_size=len(prompts))
  out['chat'] = [dict(user=q, assistant=_reply_text(tokenizer, r))
                 for q, r in zip(ec['chat_prompts'], replies)]
  return out


def _reply_text(tokenizer, ids) -> str:
  eot = tokenizer.chat_ids['end_of_turn']
  return tokenizer.decode([i for i in ids if i != eot])


def finetune(config, workdir, init_workdir) -> dict:
  """One SFT run (resumable) + its evaluation; returns the evaluation dict."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  common.validate_config(config)
  common.check_workdir(workdir)
  workdir = pathlib.Path(workdir)
  t0 = time.time()
  init_params, init_config, tokenizer = checkpoint_lib.load_stage(init_workdir)
  if init_config['model'].get('scalar_head'):
    raise common.UserError(f'--init={init_workdir} is a reward model (a scalar head, no '
                           'language-model head): start SFT from a pretraining or SFT run')
  config['model'] = init_config['model']
  config['tokenizer'] = dict(init_config['tokenizer'], path=str(init_workdir))
  config['objective'] = {'name': 'supervised'}
  config['init'] = str(init_workdir)
  if config['data']['seq_len'] > config['model']['max_len']:
    raise common.UserError(f'data.seq_len={config["data"]["seq_len"]} exceeds the init '
                           f'model\'s max_len {config["model"]["max_len"]}')
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(
        saved, config, workdir, keys=('model', 'tokenizer', 'data', 'optimizer', 'seed', 'init'),
        ignore=checkpoint_lib.RESUMABLE_CHANGES)
  mesh = common.make_mesh(config['mesh']['shape'])
  train, held, problems = load_sources(config)
  setup, stats = make_setup(config, init_config, tokenizer, train, held)
  summary, params = loop_lib.train_language_model(
      setup, workdir, objectives_lib.get_objective('supervised'), mesh,
      fresh_config=saved is None, init_params=init_params, sample_prompts=())
  if summary['stopped_by_signal']:  # saved; evaluated when the run is resumed
    return dict(train=summary, interrupted=True)
  # Stopped by train.max_minutes (the main job's time box): evaluated as it is.
  result = dict(train=summary, packing=stats,
                # on each process's whole copy of the (possibly multi-process) params
                eval=evaluate(sharding_lib.host_local(params), setup.model_cfg, tokenizer,
                              config, held, problems),
                format=config['data']['word_problems']['format'],
                minutes=(time.time() - t0) / 60)
  if jax.process_index() == 0:
    checkpoint_lib.write_json_atomic(workdir / 'eval.json', result)
  return result


def main(config, workdir):
  common.maybe_initialize_distributed()
  init = config.init
  if not init:
    raise common.UserError('no init workdir: pass --init=runs/pretrain (a finished pretraining run)')
  workdir = pathlib.Path(workdir)
  try:
    result = finetune(config, workdir, init)
  except conv_lib.ConversationError as e:
    raise common.UserError(str(e)) from None
  if result.get('interrupted'):
    common.log(f'stopped early at step {result["train"]["step"]}: run again to resume')
    return
  twin = None
  if config.eval.format_twin:
    twin_config = config.copy_and_resolve_references()
    fmt = config.data.word_problems.format
    twin_config.data.word_problems.format = 'answer_first' if fmt == 'steps_first' else 'steps_first'
    common.log(f'\n== the {twin_config.data.word_problems.format} twin')
    twin = finetune(twin_config, workdir / twin_config.data.word_problems.format, init)
    if twin.get('interrupted'):
      common.log(f'stopped early at step {twin["train"]["step"]}: run again to resume')
      return
    # The twin's workdir is inside the main one; nothing else reads it as a stage.
  if jax.process_index() == 0:
    common.log('\n' + sft_report.write(workdir))


if __name__ == '__main__':
  common.run_experiment(main, 'configs/sft.py', 'runs/sft')
