"""IsoFLOP scaling sweep: train every (budget, size) run, then fit, plot and report.

  python -m experiments.scaling --config=configs/scaling.py:cpu --workdir=runs/scaling
  python -m experiments.scaling --config=configs/scaling.py:cpu --plan   # list, train nothing

Each finished run appends one row to WORKDIR/runs.csv and is skipped on restart; a run
stopped midway resumes from its checkpoint in WORKDIR/runs/<run id>/ (Ctrl-C or SIGTERM
stop the sweep after saving). One tokenizer, trained once into WORKDIR/tokenizer.model
(or config.base.tokenizer.path), serves every run. Then both fits, the figures and
report.md are written to WORKDIR (experiments/scaling_fit.py). Every printed result
names the FLOP convention.
"""
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import pathlib
import time

import jax
from absl import flags
from jax.experimental.compilation_cache import compilation_cache

from experiments import common
from experiments import pretrain
from experiments import scaling_fit
from research import data as data_lib
from research import flops as flops_lib
from research import model as model_lib
from research import tokenizer as tokenizer_lib

CSV_COLUMNS = ('run_id', 'C', 'convention', 'params_counted', 'N', 'D', 'loss', 'causal_loss',
               'train_loss', 'n_params_total', 'n_params_non_embedding', 'flops_per_token',
               'C_actual', 'steps', 'warmup_steps', 'd_model', 'num_layers', 'num_heads',
               'vocab_size', 'seq_len', 'batch_size', 'learning_rate', 'seed', 'epochs',
               'wall_seconds', 'tokens_per_second', 'corpus', 'finished_at')


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep; `n` is the convention's parameter count."""
  run_id: str
  budget: float
  seed: int
  model: model_lib.TransformerConfig
  n: int
  flops_per_token: float
  steps: int
  tokens: int
  warmup_steps: int


def _budget_name(c: float) -> str:
  mantissa, exponent = f'{c:.2e}'.split('e')
  return f'{float(mantissa):g}e{int(exponent)}'.replace('.', 'p')


def model_config(config, d_model: int, num_layers: int) -> model_lib.TransformerConfig:
  mc = dict(config.base.model.to_dict() if hasattr(config.base.model, 'to_dict')
            else config.base.model)
  head_dim = config.sweep.head_dim
  if d_model % head_dim:
    raise common.UserError(f'sweep.shapes: d_model {d_model} is not a multiple of '
                           f'sweep.head_dim={head_dim}')
  mc.update(d_model=d_model, num_layers=num_layers, num_heads=d_model // head_dim,
            vocab_size=config.base.tokenizer.vocab_size, max_len=config.base.data.seq_len)
  try:
    return model_lib.TransformerConfig.from_dict(mc)
  except (ValueError, TypeError) as e:
    raise common.UserError(f'model config: {e}') from None


def plan(config) -> list:
  """The runs: per budget, the `sizes_per_budget` ladder shapes centred on the one whose
  tokens per parameter is nearest `tokens_per_param`; D = C / FLOPs-per-token."""
  sw = config.sweep
  convention = sw.convention
  if convention not in flops_lib.CONVENTIONS:
    raise common.UserError(f'sweep.convention={convention!r}: expected one of '
                           f'{", ".join(flops_lib.CONVENTIONS)}')
  if not sw.budgets or not sw.shapes or sw.sizes_per_budget < 1:
    raise common.UserError('sweep.budgets, sweep.shapes and sweep.sizes_per_budget must be set')
  seq_len, batch = config.base.data.seq_len, config.base.data.batch_size
  models = [model_config(config, int(d), int(l)) for d, l in sw.shapes]
  ns = [flops_lib.scaling_params(m, convention) for m in models]
  fpt = [flops_lib.train_flops_per_token(m, seq_len, convention) for m in models]
  if any(b >= a for a, b in zip(ns[1:], ns)):
    raise common.UserError(f'sweep.shapes must grow in parameters ({convention} count): {ns}')
  k = min(sw.sizes_per_budget, len(models))
  runs = []
  for budget in sorted(float(c) for c in sw.budgets):
    ratios = [budget / f / n for f, n in zip(fpt, ns)]
    centre = min(range(len(models)),
                 key=lambda i: abs(math.log(ratios[i] / sw.tokens_per_param)))
    lo = min(max(centre - k // 2, 0), len(models) - k)
    for i in range(lo, lo + k):
      m = models[i]
      steps = max(1, round(budget / fpt[i] / (seq_len * batch)))
      for seed in sw.seeds:
        runs.append(Run(
            run_id=f'c{_budget_name(budget)}_d{m.d_model}_l{m.num_layers}_s{seed}',
            budget=budget, seed=int(seed), model=m, n=ns[i], flops_per_token=fpt[i],
            steps=steps, tokens=steps * seq_len * batch,
            warmup_steps=max(1, round(sw.warmup_fraction * steps))))
  return runs


def run_config(config, run: Run, tokenizer_path) -> dict:
  """The pretrain config of one run: its model, its steps, a schedule ending at them."""
  c = config.base.to_dict()
  c['seed'] = run.seed
  c['model'].update(d_model=run.model.d_model, num_layers=run.model.num_layers,
                    num_heads=run.model.num_heads, vocab_size=run.model.vocab_size,
                    max_len=run.model.max_len)
  c['train']['steps'] = run.steps
  c['optimizer'].update(total_steps=run.steps, warmup_steps=run.warmup_steps)
  c['tokenizer']['path'] = str(tokenizer_path)
  # Every seed holds out the same documents, so all losses are on one validation set.
  c['data']['split_seed'] = int(config.sweep.seeds[0])
  return c


def read_rows(path) -> list:
  if not pathlib.Path(path).exists():
    return []
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def append_row(path, row: dict) -> None:
  """One line per finished run, flushed at once, so a killed sweep loses no finished run."""
  path = pathlib.Path(path)
  new = not path.exists() or path.stat().st_size == 0
  with open(path, 'a', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction='ignore')
    if new:
      w.writeheader()
    w.writerow(row)


def prepare_corpus(config, study: pathlib.Path) -> tuple:
  """(tokenizer path, train tokens): the shared tokenizer, trained once on the train split."""
  info_path = study / 'corpus.json'
  tok_path = pathlib.Path(config.base.tokenizer.path or study / 'tokenizer.model')
  if info_path.exists() and tok_path.exists():
    info = json.loads(info_path.read_text())
    if info.get('tokenizer') == str(tok_path) and info.get('corpus') == config.base.data.corpus:
      return tok_path, info['train_tokens']
  dc = config.base.data
  docs = data_lib.load_corpus(dc.corpus, text_field=dc.text_field)
  # The split every run makes (seed = the first sweep seed), so the tokenizer never sees
  # the validation documents.
  train_docs, val_docs = data_lib.split_documents(docs, dc.validation_fraction,
                                                  seed=config.sweep.seeds[0])
  if not val_docs:  # every fit reads validation losses: none would be null rows
    raise common.UserError(f'base.data.validation_fraction={dc.validation_fraction} holds out '
                           f'none of {len(docs)} documents: the sweep needs a validation split')
  t0 = time.time()
  try:
    tokenizer, trained = tokenizer_lib.load_or_train(
        (tok_path,), lambda: (d.text for d in train_docs), config.base.tokenizer.vocab_size,
        seed=config.sweep.seeds[0])
  except tokenizer_lib.TextError as e:  # not the vocabulary's fault
    raise common.UserError(str(e)) from None
  except ValueError as e:
    raise common.UserError(f'base.tokenizer.vocab_size: {e}') from None
  if trained:
    tokenizer.save(tok_path)
    common.log(f'tokenizer: vocab {tokenizer.vocab_size} trained in {time.time() - t0:.1f}s '
               f'-> {tok_path}')
  train_tokens = data_lib.pack_documents(tokenizer, train_docs, dc.seq_len).num_tokens
  info_path.write_text(json.dumps(dict(tokenizer=str(tok_path), corpus=dc.corpus,
                                       train_tokens=train_tokens)))
  return tok_path, train_tokens


def describe(config, runs) -> str:
  sw = config.sweep
  params = flops_lib.CONVENTION_PARAMS[sw.convention]
  lines = [f'{len(runs)} runs, FLOP convention {sw.convention} (N = {params} parameters), '
           f'corpus {config.base.data.corpus}, vocab {config.base.tokenizer.vocab_size}, '
           f'T {config.base.data.seq_len}, batch {config.base.data.batch_size}',
           f'{"run":28s} {"N":>9s} {"D":>10s} {"D/N":>7s} {"steps":>6s} {"FLOP/token":>11s}']
  for r in runs:
    lines.append(f'{r.run_id:28s} {r.n:9,d} {r.tokens:10,d} {r.tokens / r.n:7.1f} '
                 f'{r.steps:6d} {r.flops_per_token:11.3g}')
  return '\n'.join(lines)


@contextlib.contextmanager
def persistent_compilation_cache(path):
  """JAX's on-disk compilation cache in `path` for the block, then the previous setting:
  a resumed run, or another seed of one shape, skips its compiles (tens of seconds on a
  busy CPU)."""
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  compilation_cache.reset_cache()  # the cache is set up once per process unless reset
  compilation_cache.set_cache_dir(str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  try:
    yield
  finally:
    compilation_cache.reset_cache()
    jax.config.update('jax_compilation_cache_dir', old[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])


def sweep(config, study) -> list:
  """Trains every run not yet in study/runs.csv; returns all rows. Stops on a signal."""
  study = pathlib.Path(study)
  runs = plan(config)
  study.mkdir(parents=True, exist_ok=True)
  csv_path = study / 'runs.csv'
  tok_path, train_tokens = prepare_corpus(config, study)
  done = {r['run_id'] for r in read_rows(csv_path)}
  todo = [r for r in runs if r.run_id not in done]
  common.log(f'{len(runs) - len(todo)} of {len(runs)} runs already finished ({csv_path})')
  cache = (persistent_compilation_cache(study / 'jax_cache') if config.sweep.compilation_cache
           else contextlib.nullcontext())
  with cache:
    _train_runs(config, study, todo, tok_path, train_tokens)
  return read_rows(csv_path)


def _train_runs(config, study, todo, tok_path, train_tokens) -> None:
  csv_path = study / 'runs.csv'
  convention = config.sweep.convention
  for i, run in enumerate(todo):
    common.log(f'\n=== run {i + 1}/{len(todo)}: {run.run_id}: N={run.n:,} ({convention} count) '
               f'D={run.tokens:,} C={run.budget:.3g} steps={run.steps}')
    t0 = time.time()
    summary = pretrain.train(run_config(config, run, tok_path), study / 'runs' / run.run_id)
    wall = time.time() - t0
    if summary['interrupted']:
      common.log(f'{run.run_id} stopped at step {summary["step"]}; rerun to resume it')
      break
    counts = summary['params']
    row = dict(
        run_id=run.run_id, C=run.budget, convention=convention,
        params_counted=flops_lib.CONVENTION_PARAMS[convention], N=run.n, D=run.tokens,
        loss=summary['validation']['objective_loss'],
        causal_loss=summary['validation']['causal_loss'], train_loss=summary['final_train_loss'],
        n_params_total=counts['total'], n_params_non_embedding=counts['non_embedding'],
        flops_per_token=run.flops_per_token, C_actual=run.flops_per_token * run.tokens,
        steps=run.steps, warmup_steps=run.warmup_steps, d_model=run.model.d_model,
        num_layers=run.model.num_layers, num_heads=run.model.num_heads,
        vocab_size=run.model.vocab_size, seq_len=config.base.data.seq_len,
        batch_size=config.base.data.batch_size,
        learning_rate=config.base.optimizer.learning_rate, seed=run.seed,
        epochs=round(run.tokens / max(train_tokens, 1), 3), wall_seconds=round(wall, 1),
        tokens_per_second=round(run.tokens / wall, 1), corpus=config.base.data.corpus,
        finished_at=datetime.datetime.now().isoformat(timespec='seconds'))
    append_row(csv_path, row)
    common.log(f'{run.run_id}: validation loss {row["loss"]:.4f} [{convention} FLOPs], '
               f'{wall:.0f}s ({row["tokens_per_second"]:,.0f} tokens/s incl. compile/eval)')


_PLAN = flags.DEFINE_bool('plan', False, 'Print the runs and exit.')
_FIT_ONLY = flags.DEFINE_bool('fit_only', False, 'Fit the runs already in WORKDIR/runs.csv.')


def main(config, workdir):
  runs = plan(config)
  common.log(describe(config, runs))
  if _PLAN.value:
    return
  study = pathlib.Path(workdir)
  rows = read_rows(study / 'runs.csv') if _FIT_ONLY.value else sweep(config, study)
  planned = {r.run_id for r in runs}
  rows = [r for r in rows if r['run_id'] in planned]
  if len(rows) < len(runs):
    common.log(f'{len(rows)} of {len(runs)} runs finished: fitting those')
  epochs = max((float(r['epochs']) for r in rows), default=0.0)
  wall = sum(float(r['wall_seconds']) for r in rows)
  notes = [f'preset {config.preset}: corpus {config.base.data.corpus}, vocab '
           f'{config.base.tokenizer.vocab_size}, T {config.base.data.seq_len}, batch '
           f'{config.base.data.batch_size}, learning rate {config.base.optimizer.learning_rate} '
           f'(cosine to {config.base.optimizer.final_lr_fraction}× at each run\'s last step, '
           f'warmup {config.sweep.warmup_fraction:.0%} of its steps), '
           f'seeds {tuple(config.sweep.seeds)}',
           f'total wall time of the runs: {wall / 60:.1f} min; most passes over the training '
           f'data in one run: {epochs:.2f}'
           + (' (more than 4: repeated data changes the law, Muennighoff et al. 2023)'
              if epochs > 4 else '')]
  fc = config.fit
  try:
    scaling_fit.analyse(rows, study, delta=fc.huber_delta, bootstrap=fc.bootstrap, grid=fc.grid,
                        max_starts=fc.max_starts or None, seed=fc.seed,
                        budgets=[float(c) for c in config.sweep.budgets], notes=notes,
                        log=common.log)
  except scaling_fit.FitError as e:  # too few runs yet: the sweep itself went fine
    common.log(f'no fit: {e}')


if __name__ == '__main__':
  common.run_experiment(main, 'configs/scaling.py:cpu', 'runs/scaling')
