"""The pipeline's evaluation stage: every model of the run on the same held-out tests.

  (run by experiments.pipeline as its last stage; WORKDIR/evaluate/evaluation.json)

Parts, each cached in `evaluate/parts/<name>.json` as it finishes (a killed stage redoes
only the parts it had not finished), for the models pretrain, sft and rl (the RL stage's
policy: rlhf/policy after PPO and its estimators, the rlhf folder itself after DPO):

  word_problems/<model>  held-out one- and two-step word problems (`evaluate.ks`), greedy,
                         exact match of the final number, 95 % Wilson intervals:
                         without tools (the question alone; plain decoding, a call the
                         model writes is never answered) and with the calculator (the
                         question after `tools_data.calculator_system()`'s system message,
                         decoded by `runtime.generate_with_tools` with the calculator
                         live), plus the validity of every call and a few conversations.
                         The problems are the SFT stage's held-out draw for each k
                         (`conversations.word_problem_splits`, seed·1000 + k), less any
                         question of its training split.
  harness                `evaluate.tasks` on every model through lm-evaluation-harness, by
                         `python -m experiments.evaluate` (research/lm_eval_model.py; local
                         YAMLs in evals/tasks, data in ../shared/data or
                         $RESEARCH_SHARED_DATA; its tables in evaluate/harness/). Without
                         that folder (a fresh clone) the part is skipped and the record
                         says why.
  limitations            experiments.limitations at `evaluate.limitations`'s size (run by
                         the pipeline, read back from its files):
                         hallucination (with the "I don't know" mitigation), bias
                         amplification, tokens to think; models of its own, trained from
                         scratch on its synthetic data.
Runs on process 0 only (the other processes of a pod wait for nothing and finish).
"""
import collections
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
from experiments import common
from research import chat
from research import checkpoint as checkpoint_lib
from research import conversations as conv_lib
from research import evaluation
from research import model as model_lib
from research import sampling
from research.tools import data as tools_data
from research.tools import evaluation as tools_eval
from research.tools import registry
from research.tools import runtime

SUMMARY_FILE = 'evaluation.json'
SYSTEM_FILE = 'calculator_system.txt'  # the system message that declares the calculator
REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  """Where evals/tasks/local_data.py reads the harness data: $RESEARCH_SHARED_DATA, else
  ../shared/data next to this checkout."""
  return pathlib.Path(os.environ.get('RESEARCH_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def heldout_problems(sft_config: dict, per_k: int, ks) -> tuple[list, int]:
  """(held-out `conversations.Problem`s, `per_k` drawn for each k in `ks`, number dropped
  because the SFT stage trained on that question).

  The SFT stage draws its test problems first from seed `seed·1000 + k` (the test draw
  does not depend on the train size) and its training problems excluding them; drawing
  more test problems from the same seed may reach questions its training split holds,
  so those are dropped here.
  """
  wp, seed = sft_config['data']['word_problems'], sft_config['seed']
  trained_ks = range(wp['min_steps'], wp['max_steps'] + 1)
  out, dropped = [], 0
  for k in ks:
    _, test = conv_lib.word_problem_splits(0, per_k, steps=(k, k), seed=seed * 1000 + k)
    seen = set()
    if k in trained_ks:
      train, _ = conv_lib.word_problem_splits(
          wp['num_train'] // len(trained_ks), sft_config['eval']['word_problems_per_k'],
          steps=(k, k), seed=seed * 1000 + k)
      seen = {p.question for p in train}
    kept = [p for p in test if p.question not in seen]
    dropped += len(test) - len(kept)
    out += kept
  return out, dropped


def _summary(correct) -> dict:
  n = int(sum(correct))
  return dict(correct=n, total=len(correct), accuracy=n / len(correct) if correct else 0.0,
              interval=list(evaluation.wilson_interval(n, len(correct))))


def _by_k(problems, correct) -> dict:
  groups = collections.defaultdict(list)
  for p, c in zip(problems, correct):
    groups[p.k].append(bool(c))
  return {str(k): _summary(v) for k, v in sorted(groups.items())}


def word_problem_scores(model_dir, problems, ec: dict) -> dict:
  """Accuracy by k without tools and with the calculator, call validity, conversations.

  Returns:
    dict(without={k: summary}, with_tools={k: summary}, calls=call_metrics,
    conversations=[{question, gold, with_tools: messages, without: reply text}]).
  """
  params, config, tokenizer = checkpoint_lib.load_stage(model_dir)
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  eot = tokenizer.chat_ids['end_of_turn']
  user = lambda p: [{'role': 'user', 'content': p.question}]
  system = [{'role': 'system', 'content': tools_data.calculator_system()}]
  plain = [chat.render(tokenizer, user(p), add_generation_prompt=True).ids for p in problems]
  replies = sampling.complete(params, cfg, plain, max_new_tokens=ec['max_new_tokens'],
                              eos_id=eot, batch_size=ec['batch_size'])
  texts = [tokenizer.decode([t for t in r if t != eot]) for r in replies]
  without = [conv_lib.final_number(t) == str(p.answer) for t, p in zip(texts, problems)]
  calculator = {'calculator': registry.default_tools()['calculator']}
  correct, calls = tools_eval.with_tools_accuracy(
      params, cfg, tokenizer, [(system + user(p), p.answer) for p in problems], calculator,
      max_new_tokens=ec['tools_max_new_tokens'], batch_size=ec['batch_size'])
  # A few conversations in full: the last k's first problems, the calculator live.
  shown = [i for i, p in enumerate(problems) if p.k == max(q.k for q in problems)]
  shown = shown[:ec['sample_conversations']]
  prompts = [chat.render(tokenizer, system + user(problems[i]), add_generation_prompt=True
                         ).ids.tolist() for i in shown]
  out = runtime.generate_with_tools(params, cfg, tokenizer, prompts, calculator,
                                    max_new_tokens=ec['tools_max_new_tokens']) if shown else None
  conversations = []
  for row, i in enumerate(shown):
    messages = chat.parse(tokenizer, prompts[row] + list(out.tokens[row]))
    conversations.append(dict(question=problems[i].question, gold=problems[i].answer,
                              with_tools=[m for m in messages if m['role'] != 'system'],
                              with_tools_correct=bool(correct[i]), without=texts[i],
                              without_correct=bool(without[i])))
  every = [c for cs in calls for c in cs]
  return dict(without=_by_k(problems, without), with_tools=_by_k(problems, correct),
              without_all=_summary(without), with_tools_all=_summary(correct),
              calls=tools_eval.call_metrics(every, calculator),
              calls_per_problem=len(every) / max(len(problems), 1),
              conversations=conversations)


def harness_scores(models: dict, ec: dict, out_dir) -> dict:
  """The lm-eval tasks of `ec['tasks']` on every model, by experiments.evaluate's command
  line (one process for all of them; its tables land in `out_dir`).

  Returns:
    {model: {info, rows}} (rows as experiments/evaluate.py's score_rows), or {model:
    {skipped: reason}} for every model when the data folder is absent.

  Raises:
    common.UserError: the evaluation failed (its last line of stderr).
  """
  data = shared_data_dir()
  if not data.is_dir():
    reason = (f'{data} not found (a fresh clone has no ../shared; set RESEARCH_SHARED_DATA '
              'to the data folder to run these tasks)')
    return {m: dict(skipped=reason) for m in models}
  out_dir = pathlib.Path(out_dir)
  command = [sys.executable, '-m', 'experiments.evaluate', f'--tasks={",".join(ec["tasks"])}',
             f'--limit={ec["harness_limit"]}', f'--batch_size={ec["harness_batch_size"]}',
             f'--out_dir={out_dir}', '--seed=0'] + [f'--workdir={d}' for d in models.values()]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    last = (done.stderr.strip().splitlines() or ['(no stderr)'])[-1]
    raise common.UserError(f'harness evaluation failed: {last}')
  table = json.loads((out_dir / 'comparison.json').read_text())
  by_path = {pathlib.Path(info['workdir']).resolve(): name for name, info in table['info'].items()}
  out = {}
  for model, folder in models.items():
    name = by_path[pathlib.Path(folder).resolve()]
    out[model] = dict(info=table['info'][name], rows=table['rows'][name])
  return out


def run(config, workdir, models: dict, limitations_fn) -> dict:
  """Runs (or finishes) every part in `workdir`; returns (and writes) the evaluation.

  Args:
    config: the pipeline's `evaluate` section (ConfigDict or dict).
    workdir: this stage's folder.
    models: name -> a finished stage's folder ('pretrain', 'sft', 'rl'), in table order;
      the SFT stage's config.json gives the held-out word problems.
    limitations_fn: folder -> None, runs (or resumes) the limitations study there
      (experiments.limitations.run with `config.limitations`, passed in by the pipeline);
      its limitations.json and report.md are read back.

  Returns:
    dict(word_problems={model: scores}, harness={model: rows or skipped},
    limitations=the study's results, problems={per_k, ks, dropped}, minutes).
  """
  ec = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  ec = json.loads(json.dumps(ec))
  workdir = pathlib.Path(workdir)
  if jax.process_index() != 0:
    return dict(interrupted=False, other_process=True)
  (workdir / 'parts').mkdir(parents=True, exist_ok=True)
  (workdir / SYSTEM_FILE).write_text(tools_data.calculator_system())
  sft_config = checkpoint_lib.load_config(models['sft'])
  problems, dropped = heldout_problems(sft_config, ec['word_problems_per_k'], ec['ks'])
  common.log(f'held-out word problems: {len(problems)} (k in {ec["ks"]}; {dropped} dropped '
             'as questions the SFT stage trained on)')
  parts = [(f'word_problems/{m}', lambda m=m: word_problem_scores(models[m], problems, ec))
           for m in models]
  parts.append(('harness', lambda: harness_scores(models, ec, workdir / 'harness')))
  parts.append(('limitations', lambda: _limitations(limitations_fn, workdir / 'limitations')))
  progress = common.Progress(len(parts))
  t0, results = time.time(), {}
  for i, (name, fn) in enumerate(parts, 1):
    path = workdir / 'parts' / (name.replace('/', '__') + '.json')
    if not path.exists():
      checkpoint_lib.write_json_atomic(path, fn())
    results[name] = json.loads(path.read_text())  # as a resumed stage reads it
    progress.update(i, f'evaluate: {name} done', final=True)
  out = dict(word_problems={m: results[f'word_problems/{m}'] for m in models},
             harness=results['harness'], limitations=results['limitations'],
             problems=dict(per_k=ec['word_problems_per_k'], ks=list(ec['ks']), dropped=dropped,
                           total=len(problems)),
             models={m: os.path.relpath(d, workdir.parent) for m, d in models.items()},
             minutes=(time.time() - t0) / 60)
  checkpoint_lib.write_json_atomic(workdir / SUMMARY_FILE, out)
  return out


def _limitations(limitations_fn, folder: pathlib.Path) -> dict:
  """Runs the study in `folder` -> {results (without its config), report (markdown)}."""
  limitations_fn(folder)
  results = json.loads((folder / 'limitations.json').read_text())
  return dict(results={k: v for k, v in results.items() if k != 'config'},
              report=(folder / 'report.md').read_text())


def accuracy_line(r: dict) -> str:
  """'0.42 [0.31, 0.54] (21/50)' of an accuracy summary."""
  lo, hi = r['interval']
  return f'{r["accuracy"]:.2f} [{lo:.2f}, {hi:.2f}] ({r["correct"]}/{r["total"]})'

