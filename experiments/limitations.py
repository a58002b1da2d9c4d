"""What small models get wrong, measured on synthetic data with known answers.

  python -m experiments.limitations --config=configs/limitations.py --workdir=runs/limitations

Parts (config.parts):
  hallucination  a model trained on the biographies and Q&A of the known third of a
                 fictional world is asked about known and never-seen people (closed-set
                 answers scored by log-likelihood, "I don't know" among the options):
                 accuracy, made-up vs "I don't know" rates, calibration (ECE). Then the
                 Llama 3 mitigation: probe known and unknown-probe people, add "I don't
                 know" Q&A for every question answered wrong, fine-tune, and measure again
                 on the known people and an unknown-test third neither stage saw.
  bias           roles tied to groups at 70/30 in the same model's training text; the
                 role rates of its samples (T = 1), greedy answers and its probabilities,
                 with Zhao et al. (2017)'s amplification.
  think          k-step arithmetic (k = 1..4), two models from scratch, one answer-first
                 and one steps-first, same chains and steps; greedy accuracy by k.
Writes WORKDIR/limitations.json and report.md; each arm's run folder is resumable.
Metric code: research/limitations.py.
"""
import json
import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
from configs import pretrain as pretrain_config
from experiments import common
from experiments import loop as loop_lib
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import evaluation
from research import limitations as lim
from research import lm_eval_model
from research import model as model_lib
from research import objectives as objectives_lib
from research import tokenizer as tokenizer_lib

PARTS = ('hallucination', 'bias', 'think')


def lm_config(config: dict, vocab_size: int, steps: int) -> dict:
  """The pretraining config of one arm: tiny, resized by the study's config."""
  c = pretrain_config.get_config('tiny').to_dict()
  tc = config['train']
  c['seed'] = config['seed']
  c['data'].update(corpus='synthetic', seq_len=tc['seq_len'], batch_size=tc['batch_size'])
  c['tokenizer'].update(vocab_size=vocab_size)
  c['model'].update(config['model'], vocab_size=vocab_size, max_len=tc['seq_len'])
  c['optimizer'].update(learning_rate=tc['learning_rate'], warmup_steps=max(steps // 20, 1),
                        total_steps=steps)
  c['train'].update(steps=steps, eval_every=0, eval_batches=2, checkpoint_every=steps,
                    num_samples=0, log_every=max(steps // 5, 1), max_minutes=tc['max_minutes'])
  return c


def train_arm(workdir, texts, tokenizer, config: dict, steps: int, init_params=None):
  """Trains (or resumes) a causal LM on `texts` in `workdir` -> a ResearchLM of it."""
  workdir = pathlib.Path(workdir)
  cfg = lm_config(config, tokenizer.vocab_size, steps)
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, cfg, workdir)
  docs = [data_lib.Document(t) for t in texts]
  random.Random(config['seed']).shuffle(docs)
  seq_len = cfg['data']['seq_len']
  setup = loop_lib.LMSetup(
      config=cfg, model_cfg=model_lib.TransformerConfig.from_dict(cfg['model']),
      tokenizer=tokenizer, train_rows=data_lib.pack_documents(tokenizer, docs, seq_len),
      validation_rows=data_lib.pack_documents(tokenizer, docs[:max(len(docs) // 20, 1)],
                                              seq_len))
  loop_lib.train_language_model(setup, workdir, objectives_lib.get_objective('causal'),
                                common.make_mesh((1, 1, 1)), fresh_config=saved is None,
                                init_params=init_params)
  return lm_eval_model.ResearchLM(workdir=str(workdir), batch_size=64, chat=False,
                                  seed=config['seed'])


def interval(rate, n) -> list:
  if n == 0 or not np.isfinite(rate):
    return [float('nan'), float('nan')]
  return list(evaluation.wilson_interval(int(round(rate * n)), n))


# -- hallucination ------------------------------------------------------------------------


def world_texts(people, repeats: int) -> list[str]:
  """Biographies and true Q&A of `people`, `repeats` times each."""
  one = [t for p in people for t in lim.biographies(p)]
  one += [lim.qa_text(p, a) for p in people for a in lim.ATTRIBUTES]
  return one * repeats


def probe(lm, people, known: bool) -> dict:
  """Option probabilities of every (person, attribute) question -> padded arrays:
  probs N×C with "I don't know" in column 0, gold index, known flags, and questions."""
  width = 1 + max(len(lim.options(a)) - 1 for a in lim.ATTRIBUTES)
  probs, gold, questions = [], [], []
  for attribute in lim.ATTRIBUTES:
    opts = [lim.IDK] + lim.options(attribute)[:-1]
    pairs = [(lim.QUESTIONS[attribute].format(name=p.name), f' {o}.')
             for p in people for o in opts]
    scores = np.array([s for s, _ in lm.loglikelihood_texts(pairs)]).reshape(len(people), -1)
    p_NxC = lim.option_probabilities(scores)
    probs.append(np.pad(p_NxC, ((0, 0), (0, width - len(opts)))))
    gold += [opts.index(lim.answer_of(p, attribute)) for p in people]
    questions += [(p, attribute) for p in people]
  return dict(probs=np.concatenate(probs), gold=np.asarray(gold),
              known=np.full(len(gold), known), questions=questions)


def merge(*probes) -> dict:
  return dict(probs=np.concatenate([p['probs'] for p in probes]),
              gold=np.concatenate([p['gold'] for p in probes]),
              known=np.concatenate([p['known'] for p in probes]),
              questions=[q for p in probes for q in p['questions']])


def scored(pr: dict, hc: dict) -> dict:
  m = lim.hallucination_metrics(pr['probs'], pr['gold'], pr['known'], 0, hc['confident'])
  for key, n in (('known_accuracy', m['known']), ('unknown_idk', m['unknown']),
                 ('unknown_made_up', m['unknown']),
                 ('unknown_confident_made_up', m['unknown']), ('known_idk', m['known'])):
    m[key + '_ci'] = interval(m[key], n)
  return m


def hallucination(config, root, tokenizer, base_texts, people_split):
  hc = config['hallucination']
  known, unknown_probe, unknown_test = people_split
  lm = train_arm(root / 'world', base_texts, tokenizer, config, hc['steps'])
  known_before = probe(lm, known, True)
  test_before = merge(known_before, probe(lm, unknown_test, False))
  # Llama 3: probe, find what the model gets wrong, teach "I don't know" for those
  # (known people answered wrong, and the unknown-probe people, whatever was answered).
  probed = merge(known_before, probe(lm, unknown_probe, False))
  pred = probed['probs'].argmax(axis=1)
  wrong = np.where(probed['known'], pred != probed['gold'], True)
  idk = [lim.qa_text(p, a, lim.IDK) for (p, a), w in zip(probed['questions'], wrong) if w]
  common.log(f'mitigation: {len(idk)} "I don\'t know" examples for {wrong.size} probed '
             'questions answered wrong')
  tuned = train_arm(root / 'world_idk', base_texts + idk * hc['repeats'], tokenizer, config,
                    hc['finetune_steps'],
                    init_params=jax.tree.map(jnp.copy, lm.params))  # training donates
  test_after = merge(probe(tuned, known, True), probe(tuned, unknown_test, False))
  return dict(before=scored(test_before, hc), after=scored(test_after, hc),
              idk_examples=len(idk), probed_questions=int(wrong.size),
              people=dict(known=len(known), unknown_probe=len(unknown_probe),
                          unknown_test=len(unknown_test))), lm


# -- bias -------------------------------------------------------------------------------------


def bias(config, lm, train_counts) -> dict:
  bc = config['bias']
  rng = random.Random(config['seed'] + 1)
  names = [f'{a}{b}' for a in ('Zan', 'Yor', 'Xel', 'Wim', 'Vok') for b in ('a', 'u', 'ix')]
  probes = [(rng.choice(names), g) for g in range(len(lim.GROUPS)) for _ in range(bc['probes'])]
  prompts = [lim.bias_prompt(n, lim.GROUPS[g]) for n, g in probes]
  out = dict(train_counts=train_counts.tolist(),
             train_bias=lim.bias_scores(train_counts).tolist())
  for label, temperature in (('sampled', 1.0), ('greedy', 0.0)):
    counts = np.zeros_like(train_counts)
    texts = lm.generate_texts(prompts, until=['.'], max_gen_toks=6, temperature=temperature)
    for (_, g), text in zip(probes, texts):
      word = text.strip().split(' ')[0] if text.strip() else ''
      if word in lim.ROLES:
        counts[lim.ROLES.index(word), g] += 1
    out[label] = dict(counts=counts.tolist(), valid=int(counts.sum()), total=len(prompts),
                      amplification=lim.bias_amplification(train_counts, counts))
  pairs = [(p, f' {r}.') for p in prompts for r in lim.ROLES]
  scores = np.array([s for s, _ in lm.loglikelihood_texts(pairs)]).reshape(len(prompts), -1)
  probs = lim.option_probabilities(scores)
  expected = np.zeros(train_counts.shape)
  for (_, g), p in zip(probes, probs):
    expected[:, g] += p
  out['probability'] = dict(counts=expected.tolist(),
                            amplification=lim.bias_amplification(train_counts, expected))
  return out


# -- tokens to think ---------------------------------------------------------------------------


def chains(config) -> tuple[list, list]:
  """(train chains, test chains): `eval_per_k` distinct test questions per k drawn first,
  then `chains_per_k` training chains per k that never ask a test question. Raises
  UserError when a k has fewer distinct questions than eval_per_k asks for."""
  tc = config['think']
  rng = random.Random(config['seed'] + 2)
  test, held = [], set()
  for k in range(1, tc['max_k'] + 1):
    got = tries = 0
    while got < tc['eval_per_k']:
      tries += 1
      if tries > 100 * tc['eval_per_k']:
        raise common.UserError(f'think.eval_per_k={tc["eval_per_k"]}: too few distinct '
                               f'{k}-step questions')
      c = lim.make_chain(k, rng)
      if lim.chain_question(c) not in held:
        test.append(c)
        held.add(lim.chain_question(c))
        got += 1
  train = []
  for k in range(1, tc['max_k'] + 1):
    while len(train) < k * tc['chains_per_k']:
      c = lim.make_chain(k, rng)
      if lim.chain_question(c) not in held:
        train.append(c)
  return train, test


def think(config, root, tokenizer, train, test) -> dict:
  out = {}
  for fmt in lim.FORMATS:
    texts = [lim.chain_text(c, fmt) for c in train]
    lm = train_arm(root / f'think_{fmt}', texts, tokenizer, config, config['think']['steps'])
    gens = lm.generate_texts([lim.chain_prompt(c, fmt) for c in test], until=['Q:'],
                             max_gen_toks=min(64, lm.max_length // 2))
    right = [lim.parse_answer(fmt, g) == c.answer for c, g in zip(test, gens)]
    by_k = {}
    for k in range(1, config['think']['max_k'] + 1):
      r = [ok for c, ok in zip(test, right) if len(c.ops) == k]
      acc = evaluation.accuracy_summary(r)  # None (not NaN) when no test chain has k steps
      by_k[k] = dict(n=len(r), accuracy=acc['accuracy'], ci=acc['interval'] or [None, None])
    out[fmt] = dict(by_k=by_k, train_tokens=int(sum(len(tokenizer.encode(t)) for t in texts)),
                    example=lim.chain_prompt(test[-1], fmt) + gens[-1])
  return out


# -- report -----------------------------------------------------------------------------------


def _f(x):
  return '—' if x is None or not np.isfinite(x) else f'{x:.3f}'


def _ci(m, key):
  lo, hi = m[key + '_ci']
  return f'{_f(m[key])} [{_f(lo)}, {_f(hi)}]'


def report(results: dict) -> str:
  lines = ['# Limitations, measured', '']
  h = results.get('hallucination')
  if h:
    lines += ['## Hallucination (synthetic world; 95% Wilson intervals)', '',
              f'people: {h["people"]}; mitigation added {h["idk_examples"]} "I don\'t know" '
              f'examples for the {h["probed_questions"]} probed questions answered wrong.', '',
              '| model | known acc | known IDK | unknown IDK | unknown made-up | '
              'unknown confident made-up | ECE |', '|---|---|---|---|---|---|---|']
    for stage in ('before', 'after'):
      m = h[stage]
      lines.append(f'| {stage} mitigation | {_ci(m, "known_accuracy")} | {_ci(m, "known_idk")} '
                   f'| {_ci(m, "unknown_idk")} | {_ci(m, "unknown_made_up")} | '
                   f'{_ci(m, "unknown_confident_made_up")} | {_f(m["ece"])} |')
    lines += ['', f'(known = {h["before"]["known"]} questions, unknown = '
              f'{h["before"]["unknown"]}; chance on a known question ≈ 1/9–1/17)', '']
  b = results.get('bias')
  if b:
    lines += ['## Bias amplification (Zhao et al. 2017)', '',
              f'training bias b*(role, group) {np.round(b["train_bias"], 3).tolist()} '
              f'(roles {lim.ROLES} × groups {lim.GROUPS})', '',
              '| decoding | counts (role × group) | valid | amplification |', '|---|---|---|---|']
    for label in ('sampled', 'greedy'):
      lines.append(f'| {label} | {b[label]["counts"]} | {b[label]["valid"]}/{b[label]["total"]}'
                   f' | {_f(b[label]["amplification"])} |')
    lines += [f'| probabilities | {np.round(b["probability"]["counts"], 1).tolist()} | — | '
              f'{_f(b["probability"]["amplification"])} |', '']
  t = results.get('think')
  if t:
    lines += ['## Tokens to think: accuracy by steps k (95% Wilson intervals)', '',
              '| format | train tokens | ' + ' | '.join(f'k={k}' for k in t['steps_first']['by_k'])
              + ' |', '|---|---|' + '---|' * len(t['steps_first']['by_k'])]
    for fmt in lim.FORMATS:
      cells = [f'{_f(v["accuracy"])} [{_f(v["ci"][0])}, {_f(v["ci"][1])}]'
               for v in t[fmt]['by_k'].values()]
      lines.append(f'| {fmt} | {t[fmt]["train_tokens"]} | ' + ' | '.join(cells) + ' |')
    lines += ['', *[f'- {fmt} sample: `{t[fmt]["example"]}`' for fmt in lim.FORMATS], '']
  return '\n'.join(lines)


def run(config, workdir) -> dict:
  """Runs the configured parts in `workdir`; returns (and writes) the results.
  Raises common.UserError for an unknown part."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  parts = [p for p in config['parts'].split(',') if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise common.UserError(f'--config.parts: unknown part(s) {unknown}; expected {PARTS}')
  root = pathlib.Path(workdir)
  hc, seed = config['hallucination'], config['seed']
  people = lim.make_world(hc['people'], seed)
  split = lim.split_people(people, (1 / 3, 1 / 3, 1 / 3), seed)
  bias_texts, bias_counts = lim.bias_sentences(config['bias']['texts'], config['bias']['rate'],
                                               seed)
  base_texts = world_texts(split[0], hc['repeats']) + bias_texts
  train_chains, test_chains = chains(config)
  chain_texts = [lim.chain_text(c, f) for c in train_chains for f in lim.FORMATS]
  idk_texts = [lim.qa_text(p, a, lim.IDK) for p in split[1][:3] for a in lim.ATTRIBUTES]
  root.mkdir(parents=True, exist_ok=True)
  try:
    tokenizer, _ = tokenizer_lib.load_or_train(
        (root / checkpoint_lib.TOKENIZER_FILE,), lambda: base_texts + idk_texts + chain_texts,
        config['vocab_size'], seed=seed)
  except tokenizer_lib.TextError as e:  # not the vocabulary's fault
    raise common.UserError(str(e)) from None
  except ValueError as e:
    raise common.UserError(f'vocab_size: {e}') from None
  tokenizer.save(root / checkpoint_lib.TOKENIZER_FILE)
  results = dict(config=config)
  lm = None
  if 'hallucination' in parts:
    results['hallucination'], lm = hallucination(config, root, tokenizer, base_texts, split)
  if 'bias' in parts:
    if lm is None:
      lm = train_arm(root / 'world', base_texts, tokenizer, config, hc['steps'])
    results['bias'] = bias(config, lm, bias_counts)
  if 'think' in parts:
    results['think'] = think(config, root, tokenizer, train_chains, test_chains)
  checkpoint_lib.write_json_atomic(root / 'limitations.json', results)
  (root / 'report.md').write_text(report(results))
  return results


def main(config, workdir):
  results = run(config, workdir)
  common.log('\n' + report(results))
  common.log(f'wrote {pathlib.Path(workdir) / "report.md"} and limitations.json')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/limitations.py', 'runs/limitations')
