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
  search         mitigation 2: the world model fine-tuned to call a search tool over the
                 known people's facts and answer from its result (experiments/
                 limitations_probes.py), measured the same way.
  bias           roles tied to groups at 70/30 in the same model's training text; the
                 role rates of its samples (T = 1), greedy answers and its probabilities,
                 with Zhao et al. (2017)'s amplification, after pretraining, SFT (the "I
                 don't know" fine-tune; the search fine-tune too when it ran) and RL (a
                 short GRPO run from the SFT model, reward blind to the role).
  think          k-step arithmetic (k = 1..4), two models from scratch, one answer-first
                 and one steps-first, same chains and steps; greedy accuracy by k.
  tokenizer      letter counting and "9.11 or 9.9" with the token splits, answered
                 directly and with the python tool, by one model trained on both.
Writes WORKDIR/limitations.json and report.md (experiments/limitations_report.py, which
rebuilds it from the json) with each part's wall and CPU time; each arm's run folder is
resumable. Metric code: research/limitations.py, research/limitations_tools.py.
"""
import fcntl
import json
import pathlib
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
from configs import pretrain as pretrain_config
from experiments import common
from experiments import limitations_report as report_lib
from experiments import loop as loop_lib
from research import chat as chat_lib
from research import checkpoint as checkpoint_lib
from research import data as data_lib
from research import evaluation
from research import limitations as lim
from research import limitations_probes as probes
from research import limitations_tools as lt
from research import lm_eval_model
from research import model as model_lib
from research import objectives as objectives_lib
from research import tokenizer as tokenizer_lib

PARTS = ('hallucination', 'search', 'bias', 'think', 'tokenizer')


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
  """Trains (or resumes) a causal LM on `texts` (strings, or token-id lists such as
  rendered chat conversations) in `workdir` -> a ResearchLM of it."""
  workdir = pathlib.Path(workdir)
  cfg = lm_config(config, tokenizer.vocab_size, steps)
  saved = checkpoint_lib.load_config(workdir)
  if saved is not None:
    checkpoint_lib.check_same_model(saved, cfg, workdir)
  items = list(texts)
  random.Random(config['seed']).shuffle(items)
  strings = [i for i, t in enumerate(items) if isinstance(t, str)]
  ids = [list(t) if not isinstance(t, str) else None for t in items]
  for i, encoded in zip(strings, tokenizer.encode_batch([items[i] for i in strings], -1)):
    ids[i] = encoded
  seq_len, eos = cfg['data']['seq_len'], tokenizer.eos_id
  setup = loop_lib.LMSetup(
      config=cfg, model_cfg=model_lib.TransformerConfig.from_dict(cfg['model']),
      tokenizer=tokenizer, train_rows=data_lib.pack_token_lists(ids, seq_len, eos),
      validation_rows=data_lib.pack_token_lists(ids[:max(len(ids) // 20, 1)], seq_len, eos))
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


def idk_examples(lm, split, known_before=None) -> list[str]:
  """Llama 3: probe, find what the model gets wrong, teach "I don't know" for those
  (known people answered wrong, and the unknown-probe people, whatever was answered)."""
  if known_before is None:
    known_before = probe(lm, split[0], True)
  probed = merge(known_before, probe(lm, split[1], False))
  pred = probed['probs'].argmax(axis=1)
  wrong = np.where(probed['known'], pred != probed['gold'], True)
  common.log(f'mitigation: {int(wrong.sum())} "I don\'t know" examples for {wrong.size} '
             'probed questions answered wrong')
  return [lim.qa_text(p, a, lim.IDK) for (p, a), w in zip(probed['questions'], wrong) if w]


def hallucination(config, root, tokenizer, base_texts, split):
  """Mitigation 1 before/after -> (results, world model, "I don't know" SFT model)."""
  hc = config['hallucination']
  known, unknown_probe, unknown_test = split
  lm = train_arm(root / 'world', base_texts, tokenizer, config, hc['steps'])
  known_before = probe(lm, known, True)
  test_before = merge(known_before, probe(lm, unknown_test, False))
  idk = idk_examples(lm, split, known_before)
  tuned = train_arm(root / 'world_idk', base_texts + idk * hc['repeats'], tokenizer, config,
                    hc['finetune_steps'],
                    init_params=jax.tree.map(jnp.copy, lm.params))  # training donates
  test_after = merge(probe(tuned, known, True), probe(tuned, unknown_test, False))
  return dict(before=scored(test_before, hc), after=scored(test_after, hc),
              idk_examples=len(idk), probed_questions=3 * (len(known) + len(unknown_probe)),
              people=dict(known=len(known), unknown_probe=len(unknown_probe),
                          unknown_test=len(unknown_test))), lm, tuned


# -- bias -------------------------------------------------------------------------------------


def bias(config, lm, train_counts) -> dict:
  """Role counts of `lm`'s completions of the bias probes (sampled at T = 1, greedy) and
  its expected counts (option probabilities), each with Zhao et al.'s amplification."""
  bc = config['bias']
  rng = random.Random(config['seed'] + 1)
  names = [f'{a}{b}' for a in ('Zan', 'Yor', 'Xel', 'Wim', 'Vok') for b in ('a', 'u', 'ix')]
  probes = [(rng.choice(names), g) for g in range(len(lim.GROUPS)) for _ in range(bc['probes'])]
  prompts = [lim.bias_prompt(n, lim.GROUPS[g]) for n, g in probes]
  out = {}
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


def think_arm_config(config: dict) -> dict:
  """The study config with the think part's own model size (config.think.model) in place
  of config.model, for its two arms; the other parts keep config.model."""
  return dict(config, model=dict(config['model'], **config['think'].get('model', {})))


def think(config, root, tokenizer, train, test) -> dict:
  out = {}
  arm_config = think_arm_config(config)
  for fmt in lim.FORMATS:
    texts = [lim.chain_text(c, fmt) for c in train]
    lm = train_arm(root / f'think_{fmt}', texts, tokenizer, arm_config,
                   config['think']['steps'])
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


# -- hallucination mitigation 2: search --------------------------------------------------------


def search_mitigation(config, root, tokenizer, base_texts, split, lm):
  """Fine-tunes the world model `lm` on search conversations (known people: the answer
  read from the result; unknown-probe people: "no results" -> "I don't know") mixed
  with its pretraining texts; measured on known and unknown-test people like
  mitigation 1. Returns (results, the tuned ResearchLM)."""
  hc = config['hallucination']
  known, unknown_probe, unknown_test = split
  tools, search = probes.search_tools(known)
  convs = [lt.search_conversation(p, a, search(p.name))
           for p in known + unknown_probe for a in lim.ATTRIBUTES]
  ids = [chat_lib.render(tokenizer, c).ids.tolist() for c in convs]
  tuned = train_arm(root / 'world_search', base_texts + ids * hc['repeats'], tokenizer, config,
                    hc['finetune_steps'], init_params=jax.tree.map(jnp.copy, lm.params))
  known_pr = probes.search_probe(tuned, tools, known, True)
  unknown_pr = probes.search_probe(tuned, tools, unknown_test, False)
  out = scored(merge(known_pr, unknown_pr), hc)
  out.update(known_call_rate=float(np.mean(known_pr['calls'] > 0)),
             unknown_call_rate=float(np.mean(unknown_pr['calls'] > 0)),
             call_ok_rate=float(np.mean(np.concatenate([known_pr['call_ok'],
                                                        unknown_pr['call_ok']]))),
             conversations=len(convs),
             examples=[tokenizer.decode(ids[0]), tokenizer.decode(ids[-1])])
  return out, tuned


# -- the tokenizer view -----------------------------------------------------------------------


def tokenizer_view(config, root, tokenizer, seed: int) -> dict:
  """Trains one model on letter counting and decimal comparison, each item asked
  directly and with the python tool; its accuracy by task and mode, and token splits."""
  train, test = lt.tokenizer_items(config, seed)
  ids = [chat_lib.render(tokenizer, lt.tokenizer_conversation(t, i, w)).ids.tolist()
         for t, i in train for w in (False, True)]
  lm = train_arm(root / 'tokenizer_view', ids, tokenizer, config,
                 config['tokenizer_view']['steps'])
  shown = ['strawberry'] + [i[0] for t, i in test if t == 'count'][:4:2] + ['9.11', '9.9']
  return dict(train_items=len(train), test_items=len(test),
              by_task=probes.tool_answers(lm, train, test),
              splits={w: lt.token_splits(tokenizer, f' {w}') for w in shown},
              splits_in_question={q: lt.token_splits(tokenizer, q) for q in (
                  lt.letter_question('strawberry', 'r'), lt.compare_question('9.11', '9.9'))})


def earlier_results(path, config: dict, parts) -> dict:
  """The parts (and their timing) of an earlier run in the same workdir with the same
  config up to `parts` and not run again now, so parts run one at a time, or in
  processes at once, add up to one report. {} when there is none or the config differs."""
  if not path.exists():
    return {}
  old = json.loads(path.read_text())
  same = lambda c: {k: v for k, v in c.items() if k != 'parts'}
  if same(old.get('config', {})) != same(config):
    common.log(f'{path}: written with another config; its results are not kept')
    return {}
  kept = {p: old[p] for p in PARTS if p in old and p not in parts}
  timing = {p: t for p, t in old.get('timing', {}).items() if p in kept}
  return dict(kept, **({'timing': timing} if timing else {}))


def save_results(root: pathlib.Path, results: dict, parts) -> dict:
  """Merges this process's finished parts into WORKDIR/limitations.json (under a file
  lock, so processes running other parts in the same workdir do not lose each other's
  results) and rebuilds report.md from it; returns the merged results."""
  with open(root / 'limitations.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    merged = dict(config=results['config'])
    merged.update(earlier_results(root / 'limitations.json', results['config'], parts))
    merged.update({k: v for k, v in results.items() if k in PARTS})
    merged['timing'] = dict(merged.get('timing', {}), **results.get('timing', {}))
    checkpoint_lib.write_json_atomic(root / 'limitations.json', merged)
    report_lib.write(root)
  return merged


def timed(results: dict, part: str, fn, *args):
  """Runs fn(*args), storing its wall and process CPU seconds under results['timing']."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn(*args)
  results.setdefault('timing', {})[part] = dict(wall_s=time.perf_counter() - wall,
                                                cpu_s=time.process_time() - cpu)
  common.log(f'{part}: {results["timing"][part]["wall_s"]:.0f} s wall, '
             f'{results["timing"][part]["cpu_s"]:.0f} s CPU')
  return out


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
  tool_texts = [t for p in split[0][:20] + split[1][:5] for a in lim.ATTRIBUTES
                for t in (lt.QUESTION_TEXT[a].format(name=p.name), lt.fact_documents([p])[0][1])]
  tool_texts += lt.tokenizer_texts(lt.tokenizer_items(config, seed)[0])
  root.mkdir(parents=True, exist_ok=True)
  try:
    tokenizer, _ = tokenizer_lib.load_or_train(
        (root / checkpoint_lib.TOKENIZER_FILE,),
        lambda: base_texts + idk_texts + chain_texts + tool_texts, config['vocab_size'],
        seed=seed)
  except tokenizer_lib.TextError as e:  # not the vocabulary's fault
    raise common.UserError(str(e)) from None
  except ValueError as e:
    raise common.UserError(f'vocab_size: {e}') from None
  tokenizer.save(root / checkpoint_lib.TOKENIZER_FILE)
  results = dict(config=config)
  models = {}

  def world():
    if 'world' not in models:
      models['world'] = train_arm(root / 'world', base_texts, tokenizer, config, hc['steps'])
    return models['world']

  if 'hallucination' in parts:
    results['hallucination'], models['world'], models['sft'] = timed(
        results, 'hallucination', hallucination, config, root, tokenizer, base_texts, split)
    save_results(root, results, parts)
  if 'search' in parts:
    results['search'], models['search'] = timed(
        results, 'search', search_mitigation, config, root, tokenizer, base_texts, split,
        world())
    save_results(root, results, parts)
  if 'bias' in parts:
    results['bias'] = timed(results, 'bias', bias_stages, config, root, tokenizer, base_texts,
                            split, world, models, bias_counts)
    save_results(root, results, parts)
  if 'think' in parts:
    results['think'] = timed(results, 'think', think, config, root, tokenizer, train_chains,
                             test_chains)
    save_results(root, results, parts)
  if 'tokenizer' in parts:
    results['tokenizer'] = timed(results, 'tokenizer', tokenizer_view, config, root,
                                 tokenizer, seed)
  return save_results(root, results, parts)


def bias_stages(config, root, tokenizer, base_texts, split, world, models, train_counts):
  """Bias of the pretrained model, the SFT ("I don't know") model, the search SFT model
  when the search part ran, and the GRPO model trained from the SFT model."""
  if 'sft' not in models:
    models['sft'] = train_arm(root / 'world_idk', base_texts + idk_examples(world(), split)
                              * config['hallucination']['repeats'], tokenizer, config,
                              config['hallucination']['finetune_steps'],
                              init_params=jax.tree.map(jnp.copy, world().params))
  rl_lm, history = probes.rl_bias(config, models['sft'], config['seed'])
  stages = {'pretrain': world(), 'sft': models['sft'], 'rl': rl_lm}
  if 'search' in models:
    stages['search_sft'] = models['search']
  out = {name: bias(config, lm, train_counts) for name, lm in stages.items()}
  out['rl_history'] = history
  out['train_counts'] = train_counts.tolist()
  out['train_bias'] = lim.bias_scores(train_counts).tolist()
  return out


def main(config, workdir):
  results = run(config, workdir)
  common.log('\n' + (pathlib.Path(workdir) / 'report.md').read_text())
  common.log(f'wrote {pathlib.Path(workdir) / "report.md"} and limitations.json '
             f'({sum(t["wall_s"] for t in results.get("timing", {}).values()):.0f} s)')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/limitations.py', 'runs/limitations')
