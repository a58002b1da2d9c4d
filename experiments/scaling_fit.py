"""Fit any table of runs: approach 2 (IsoFLOP parabolas) and approach 3 (L(N, D)), with plots.

  python -m experiments.scaling_fit runs.csv [--out=DIR] [--bootstrap=200] [--budgets=1e20,1e21]

The CSV needs columns N, D and loss (final validation loss, nats/token); C (the budget of
each run; runs whose C differ by at most --budget_tolerance, default 10%, are one budget)
enables approach 2, and `convention` (the FLOP
convention, research/flops.py) is printed with every result. Other columns are kept for
the report. Writes isoflop.png, optimal.png, contours.png, frontier.png, fit.json and
report.md to --out (default: the CSV's folder).
"""
import collections
import csv
import json
import math
import pathlib
import sys

import numpy as np
from absl import flags

from research import scaling_fit as sf

CHINCHILLA = ('Chinchilla (Hoffmann et al. 2022): approach 2 a = 0.49 (95% CI 0.462–0.534), '
              'approach 3 a = 0.46 (α 0.34, β 0.28, E 1.69); Besiroglu et al. 2024 refit of '
              'approach 3: α 0.35, β 0.37, E 1.82, a = 0.51; about 20 tokens per parameter. '
              'Kaplan et al. 2020 (non-embedding N, fixed schedule): a = 0.73.')


class FitError(ValueError):
  """A table that cannot be fitted (missing columns, too few runs)."""


def read_runs(path) -> list:
  """The CSV's rows as dicts, each with `_line`: its line number in the file (for naming
  the rows that are dropped)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FitError(f'{path}: no such file')
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      rows = [dict(row, _line=reader.line_num) for row in reader]
  except (UnicodeDecodeError, csv.Error) as e:
    raise FitError(f'{path}: not a UTF-8 CSV table ({e})') from None
  missing = {'N', 'D', 'loss'} - set(rows[0] if rows else {})
  if not rows or missing:
    raise FitError(f'{path}: needs columns N, D, loss (missing {sorted(missing) or "all rows"})')
  return rows


def convention_of(rows) -> str:
  names = sorted({r.get('convention', '') for r in rows} - {''})
  if len(names) > 1:
    raise FitError(f'runs under different FLOP conventions {names}: fit one at a time')
  return names[0] if names else 'unknown'


def fmt(x, digits=3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return 'n/a'
  return f'{x:.{digits}g}'


def fmt_ci(ci, digits=3) -> str:
  return f'[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]'


MAX_PRINTED = 6  # per-budget lines printed; beyond it, a summary line (all in report.md)


def analyse(rows, out_dir, *, delta=1e-3, bootstrap=200, grid='hoffmann', max_starts=100,
            seed=0, budgets=(), notes=(), budget_tolerance=sf.BUDGET_TOLERANCE,
            log=print) -> dict:
  """Both fits, the figures and report.md for the runs in `rows` (dicts, e.g. CSV rows).

  Rows without a positive finite N, D, loss (and C) are dropped, each counted and named
  (row, CSV line, reason) in the log, fit.json and report.md. Runs are grouped into
  IsoFLOP budgets within `budget_tolerance` (research.scaling_fit.group_budgets). The log
  stays short: per-budget lines only up to MAX_PRINTED budgets, a summary line beyond.
  Raises FitError for fewer than 5 usable runs or mixed FLOP conventions.
  """
  convention = convention_of(rows)
  params = sorted({r.get('params_counted', '') for r in rows} - {''})
  label = f'[{convention} FLOPs' + (f', N = {params[0]} params]' if params else ']')
  t, used, dropped = sf.usable_runs(rows)
  n, d, loss = t['N'], t['D'], t['loss']
  dropped_text = [f'{sf.row_name(rows, i)}: {why}' for i, why in dropped]
  if len(n) < 5:
    raise FitError(f'{len(n)} usable runs of {len(rows)}: approach 3 needs at least 5 (5 '
                   'parameters)' + (f'; dropped {dropped_text[0]}' if dropped else '')
                   + (f' and {len(dropped) - 1} more' if len(dropped) > 1 else ''))
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  log(f'runs {label}: {len(rows)} read, {len(used)} used, {len(dropped)} dropped'
      + (': ' + '; '.join(dropped_text[:3]) if dropped else '')
      + (f' (and {len(dropped) - 3} more: all in report.md)' if len(dropped) > 3 else ''))
  no_c = [sf.row_name(rows, i) for i, r in enumerate(rows) if not r.get('C')]
  if 'C' not in t and len(no_c) < len(rows):
    log(f'approach 2 skipped: no C in {len(no_c)} rows ({", ".join(no_c[:3])}'
        + (', ...' if len(no_c) > 3 else '') + ')')
  # C = k·N·D links a budget to N and D in approach 3; k from the runs themselves.
  k = float(np.exp(np.mean(np.log(t['C'] / (n * d))))) if 'C' in t else 6.0
  result = dict(convention=convention, params_counted=params[0] if params else None,
                num_rows=len(rows), num_runs=int(len(n)), flops_per_param_token=k,
                used_rows=[sf.row_name(rows, i) for i in used],
                dropped_rows=[dict(row=sf.row_name(rows, i), reason=why) for i, why in dropped])

  a2 = None
  if 'C' in t:
    a2 = sf.approach2(n, d, t['C'], loss, budget_tolerance)
    boot2 = (sf.approach2_bootstrap(n, d, t['C'], loss, bootstrap, seed, budget_tolerance)
             if bootstrap else None)
    result['approach2'] = dict(
        budget_tolerance=budget_tolerance,
        budgets=[dict(C=f.budget, n_opt=f.n_opt, d_opt=f.d_opt, loss_opt=f.loss_opt,
                      tokens_per_param=f.d_opt / f.n_opt, edge=f.edge, reason=f.reason,
                      num_runs=f.num_runs, coeffs=list(f.coeffs)) for f in a2['fits']],
        a=a2['a'], b=a2['b'],
        a_bootstrap=sf.interval(boot2[:, 0]) if boot2 is not None else None,
        b_bootstrap=sf.interval(boot2[:, 1]) if boot2 is not None else None)
    fits = a2['fits']
    if len(fits) <= MAX_PRINTED:
      for f in fits:
        flag = f'  EDGE ({f.reason}): left out' if f.edge else ''
        log(f'approach 2 {label} C={f.budget:.3g}: N_opt={fmt(f.n_opt)} D_opt={fmt(f.d_opt)} '
            f'loss={fmt(f.loss_opt, 4)} D/N={fmt(f.d_opt / f.n_opt)}{flag}')
    else:
      reasons = collections.Counter(_reason_kind(f.reason) for f in fits if f.edge)
      log(f'approach 2 {label}: {len(fits)} budgets (runs within a factor '
          f'{1 + budget_tolerance:g} grouped), {len(fits) - sum(reasons.values())} bracketed'
          + (', left out: ' + ', '.join(f'{v} {r}' for r, v in reasons.most_common())
             if reasons else '') + ' (per-budget table in report.md)')
    for key, what in (('a', 'N_opt ∝ C^a'), ('b', 'D_opt ∝ C^b')):
      p = a2[key]
      boot = result['approach2'][f'{key}_bootstrap']
      log(f'approach 2 {label}: {what}: {key} = {fmt(p["slope"])} ± {fmt(p["se"], 2)} '
          f'(95% t-interval {fmt_ci(p["ci"])} over {p["num"]} budgets'
          + (f'; bootstrap {fmt_ci(boot["ci"])}' if boot else '') + ')')

  fit = sf.fit_law(n, d, loss, delta, sf.init_grid(grid), max_starts=max_starts)
  law = fit.law
  report_budgets = sorted(set(budgets) | (set(np.unique(a2['labels'])) if a2 else set()))
  laws = sf.bootstrap_laws(n, d, loss, bootstrap, fit.solutions, delta, seed) if bootstrap else []
  iv = sf.law_intervals(laws, report_budgets, k) if laws else {}
  result['approach3'] = dict(
      E=law.E, A=law.A, B=law.B, alpha=law.alpha, beta=law.beta, a=law.a, b=law.b,
      objective=fit.objective, huber_delta=delta, bootstrap=bootstrap,
      intervals={key: iv[key] for key in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')} if iv else {},
      optimal=[dict(C=c, **{q: float(v) for q, v in law.compute_optimal(c, k).items()},
                    intervals={q: iv[(c, q)] for q in ('n', 'd', 'loss', 'tokens_per_param')}
                    if iv else {}) for c in report_budgets])
  def with_ci(name, value):
    s = iv.get(name)
    return (f'{fmt(value)} ± {fmt(s["se"], 2)} {fmt_ci(s["ci"])}' if s else fmt(value))
  log(f'approach 3 {label}: E={with_ci("E", law.E)} A={with_ci("A", law.A)} '
      f'B={with_ci("B", law.B)} α={with_ci("alpha", law.alpha)} β={with_ci("beta", law.beta)}')
  log(f'approach 3 {label}: a = β/(α+β) = {with_ci("a", law.a)}, b = {with_ci("b", law.b)} '
      f'({bootstrap} bootstrap resamples of {len(n)} runs, 95% percentile intervals)')
  optimal = result['approach3']['optimal']
  if len(optimal) > MAX_PRINTED:  # the asked budgets and the largest; the rest in report.md
    shown = [o for o in optimal if o['C'] in set(budgets) or o is optimal[-1]]
    log(f'approach 3 {label}: compute-optimal N, D at {len(optimal)} budgets in report.md; '
        f'{len(shown)} here')
    optimal = shown
  for o in optimal:
    ci = o['intervals']
    def part(q):
      return fmt(o[q]) + (f' {fmt_ci(ci[q]["ci"])}' if ci else '')
    log(f'approach 3 {label} C={o["C"]:.3g} (C = {k:.2f}·N·D): N_opt={part("n")} '
        f'D_opt={part("d")} loss={part("loss")} D/N={part("tokens_per_param")}')

  figures = plot(out_dir, t, a2, law, fit, laws, k, label)
  result['figures'] = figures
  (out_dir / 'fit.json').write_text(json.dumps(result, indent=1, default=_json_default))
  (out_dir / 'report.md').write_text(report(rows, result, label, notes, used, dropped))
  log(f'wrote {out_dir / "report.md"}, fit.json and {", ".join(figures)}')
  return result


def _reason_kind(reason: str) -> str:
  """An edge reason without its numbers: '1 sizes (a parabola needs 3)' -> 'under 3 sizes'."""
  return 'under 3 sizes' if 'parabola needs 3' in reason else reason


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def plot(out_dir, t, a2, law, fit, laws, k, label) -> list:
  """isoflop.png, optimal.png, contours.png, frontier.png (the first two need C)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  n, d, loss = t['N'], t['D'], t['loss']
  written = []
  cmap = plt.get_cmap('viridis')

  def save(fig, name):
    for ax in fig.axes:  # log axes spanning < 1 decade label every minor tick, overlapping
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    written.append(name)

  if a2 is not None:
    labels = a2['labels']
    fits = a2['fits']
    colours = {f.budget: cmap(i / max(len(fits) - 1, 1)) for i, f in enumerate(fits)}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for f in fits:
      sel = labels == f.budget
      col = colours[f.budget]
      ax.scatter(n[sel], loss[sel], color=col, label=f'C={f.budget:.2g}')
      if np.all(np.isfinite(f.coeffs)):
        xs = np.linspace(np.log(n[sel].min()) - 0.2, np.log(n[sel].max()) + 0.2, 100)
        ax.plot(np.exp(xs), np.polyval(f.coeffs, xs), color=col, lw=1)
        ax.plot(f.n_opt, f.loss_opt, marker='*', ms=14, color=col,
                mfc='none' if f.edge else col, mec='k' if not f.edge else col)
    ax.set(xscale='log', xlabel='N (parameters)', ylabel='final validation loss',
           title=f'IsoFLOP curves {label}\n(hollow star: edge optimum, left out)')
    if len(fits) <= 2 * MAX_PRINTED:  # (a legend of hundreds of budgets hides the plot)
      ax.legend(fontsize=8)
    save(fig, 'isoflop.png')

    good = [f for f in fits if not f.edge]
    cs = np.array(sorted(set(labels)))
    grid_c = np.logspace(np.log10(cs.min()) - 0.3, np.log10(cs.max()) + 0.3, 50)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, attr, name in ((axes[0], 'a', 'n_opt', 'N_opt'), (axes[1], 'b', 'd_opt', 'D_opt')):
      p = a2[key]
      ax.scatter([f.budget for f in good], [getattr(f, attr) for f in good], color='C0',
                 label='approach 2 (IsoFLOP vertices)')
      bad = [f for f in fits if f.edge and np.isfinite(getattr(f, attr))]
      if bad:
        ax.scatter([f.budget for f in bad], [getattr(f, attr) for f in bad], color='C0',
                   facecolor='none', label='edge optima (left out)')
      if np.isfinite(p['slope']):
        ax.plot(grid_c, p['coef'] * grid_c ** p['slope'], color='C0',
                label=f'C^{p["slope"]:.3f}')
      opt = law.compute_optimal(grid_c, k)
      ax.plot(grid_c, opt[attr[0]], color='C3',
              label=f'approach 3: C^{getattr(law, key):.3f}')
      if laws:
        band = np.array([l.compute_optimal(grid_c, k)[attr[0]] for l in laws])
        ax.fill_between(grid_c, *np.percentile(band, [2.5, 97.5], axis=0), color='C3', alpha=0.2)
      ax.set(xscale='log', yscale='log', xlabel='C (FLOPs)', ylabel=name)
      ax.legend(fontsize=8)
    fig.suptitle(f'Compute-optimal N and D {label}')
    save(fig, 'optimal.png')

  fig, ax = plt.subplots(figsize=(6.5, 5))
  ln_lo, ln_hi = np.log(n.min()) - 0.5, np.log(n.max()) + 0.5
  ld_lo, ld_hi = np.log(d.min()) - 0.5, np.log(d.max()) + 0.5
  gn, gd = np.meshgrid(np.exp(np.linspace(ln_lo, ln_hi, 120)),
                       np.exp(np.linspace(ld_lo, ld_hi, 120)))
  surf = law.loss(gn, gd)
  levels = np.linspace(np.percentile(surf, 1), np.percentile(surf, 99), 15)
  cs_ = ax.contourf(gn, gd, surf, levels=levels, cmap='viridis_r', extend='both')
  fig.colorbar(cs_, ax=ax, label='fitted L(N, D)')
  ax.scatter(n, d, c=loss, cmap='viridis_r', norm=cs_.norm, edgecolors='k', s=40, zorder=3)
  if a2 is not None:
    lines_c = np.unique(a2['labels'])
    for c in lines_c[::max(1, len(lines_c) // (2 * MAX_PRINTED))]:  # (hundreds: a smear)
      ns = np.exp(np.linspace(ln_lo, ln_hi, 10))
      ax.plot(ns, c / (k * ns), color='w', lw=0.7, ls=':')
  cpath = np.logspace(np.log10(k * n.min() * d.min()), np.log10(k * n.max() * d.max()), 50)
  opt = law.compute_optimal(cpath, k)
  ax.plot(opt['n'], opt['d'], color='C3', label='compute-optimal (approach 3)')
  ax.set(xscale='log', yscale='log', xlim=(np.exp(ln_lo), np.exp(ln_hi)),
         ylim=(np.exp(ld_lo), np.exp(ld_hi)), xlabel='N (parameters)', ylabel='D (tokens)',
         title=f'L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}\n'
               f'{label}, dotted: iso-FLOP lines')
  ax.legend(fontsize=8, loc='upper right')
  save(fig, 'contours.png')

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  if a2 is not None:
    labels = a2['labels']
    cs = np.unique(labels)
    ax.scatter(t['C'], loss, color='0.6', s=12, label='runs')
    ax.plot(cs, [loss[labels == c].min() for c in cs], 'o-', color='C0',
            label='best run per budget')
    if a2 is not None:
      ok = [f for f in a2['fits'] if not f.edge]
      ax.scatter([f.budget for f in ok], [f.loss_opt for f in ok], marker='*', s=120,
                 color='C1', zorder=3, label='approach 2 vertices')
    grid_c = np.logspace(np.log10(cs.min()) - 0.5, np.log10(cs.max()) + 0.5, 60)
  else:
    cflops = k * n * d
    ax.scatter(cflops, loss, color='0.6', s=12, label='runs (C = k·N·D)')
    grid_c = np.logspace(np.log10(cflops.min()) - 0.5, np.log10(cflops.max()) + 0.5, 60)
  ax.plot(grid_c, law.compute_optimal(grid_c, k)['loss'], color='C3',
          label='approach 3 compute-optimal loss')
  if laws:
    band = np.array([l.compute_optimal(grid_c, k)['loss'] for l in laws])
    ax.fill_between(grid_c, *np.percentile(band, [2.5, 97.5], axis=0), color='C3', alpha=0.2)
  ax.axhline(law.E, color='k', ls=':', lw=0.8, label=f'E = {law.E:.3f}')
  ax.set(xscale='log', xlabel='C (FLOPs)', ylabel='final validation loss',
         title=f'Loss frontier {label}')
  ax.legend(fontsize=8)
  save(fig, 'frontier.png')
  return written


def report(rows, result, label, notes, used=None, dropped=()) -> str:
  """report.md: setup, both fits with intervals, the optimum at the largest budget, the
  runs used (exactly those) and every row dropped with its reason."""
  used = list(range(len(rows))) if used is None else used
  a3 = result['approach3']
  iv = a3['intervals']
  lines = [f'# Scaling-law fit {label}', '']
  lines += [f'- {x}' for x in notes]
  lines += [f'- {len(used)} runs used of {len(rows)} rows'
            + (f' ({len(dropped)} dropped: see "Dropped rows")' if dropped else '')
            + f'; FLOP convention **{result["convention"]}**, N counted as '
            f'**{result["params_counted"] or "given"}** parameters; in approach 3, '
            f'C = {result["flops_per_param_token"]:.2f}·N·D (mean of the runs\' C/(N·D)).', '']
  if 'approach2' in result:
    r2 = result['approach2']
    lines += ['## Approach 2: IsoFLOP parabolas', '',
              f'Runs whose C differ by at most a factor {1 + r2["budget_tolerance"]:g} form one '
              'budget (labelled by their geometric mean; `--budget_tolerance`).', '',
              '| C | runs | N_opt | D_opt | D/N | loss at vertex | |',
              '|---|---|---|---|---|---|---|']
    for b in r2['budgets']:
      lines.append(f'| {b["C"]:.3g} | {b["num_runs"]} | {fmt(b["n_opt"])} | {fmt(b["d_opt"])} | '
                   f'{fmt(b["tokens_per_param"])} | {fmt(b["loss_opt"], 4)} | '
                   f'{"edge: " + b["reason"] + " (left out)" if b["edge"] else ""} |')
    lines.append('')
    for key, what in (('a', 'N_opt ∝ C^a'), ('b', 'D_opt ∝ C^b')):
      p, boot = r2[key], r2[f'{key}_bootstrap']
      lines.append(f'- {what}: **{key} = {fmt(p["slope"])}** ± {fmt(p["se"], 2)}, 95% t-interval '
                   f'{fmt_ci(p["ci"])} over {p["num"]} bracketed budgets'
                   + (f'; bootstrap over runs {fmt_ci(boot["ci"])}' if boot else '') + '.')
    lines.append('')
  lines += ['## Approach 3: L(N, D) = E + A/N^α + B/D^β', '',
            f'Huber δ = {a3["huber_delta"]} on log L, L-BFGS from a grid of starts, '
            f'{a3["bootstrap"]} bootstrap resamples of the runs (± standard error, '
            '[95% percentile interval]).', '', '| | fit | ± | 95% interval |', '|---|---|---|---|']
  for key, name in (('E', 'E'), ('A', 'A'), ('B', 'B'), ('alpha', 'α'), ('beta', 'β'),
                    ('a', 'a = β/(α+β)'), ('b', 'b = α/(α+β)')):
    s = iv.get(key)
    lines.append(f'| {name} | {fmt(a3[key])} | {fmt(s["se"], 2) if s else ""} | '
                 f'{fmt_ci(s["ci"]) if s else ""} |')
  lines += ['', '| C | N_opt | D_opt | D/N | loss |', '|---|---|---|---|---|']
  for o in a3['optimal']:
    ci = o['intervals']
    def cell(q):
      return fmt(o[q]) + (f' {fmt_ci(ci[q]["ci"])}' if ci else '')
    lines.append(f'| {o["C"]:.3g} | {cell("n")} | {cell("d")} | {cell("tokens_per_param")} | '
                 f'{cell("loss")} |')
  if a3['optimal']:
    top = a3['optimal'][-1]
    lines += ['', f'At the largest budget C = {top["C"]:.3g}: approach 3 gives '
              f'{fmt(top["tokens_per_param"])} tokens per parameter'
              + (f' (95% {fmt_ci(top["intervals"]["tokens_per_param"]["ci"])})'
                 if top['intervals'] else '')]
    if 'approach2' in result:
      b = [x for x in result['approach2']['budgets'] if x['C'] == top['C']]
      if b:
        lines[-1] += (f', approach 2 {fmt(b[0]["tokens_per_param"])}'
                      + (' (edge optimum)' if b[0]['edge'] else ''))
    lines[-1] += '.'
  lines += ['', '## For comparison', '', CHINCHILLA, '', '## Figures', '']
  lines += [f'![{f}]({f})' for f in result.get('figures', [])]
  cols = [c for c in ('run_id', 'C', 'N', 'D', 'loss', 'd_model', 'num_layers', 'steps',
                      'epochs', 'wall_seconds') if c in rows[0]]
  lines += ['', '## Runs used', '', '| row | ' + ' | '.join(cols) + ' |',
            '|' + '---|' * (len(cols) + 1)]
  for i in used:
    lines.append(f'| {sf.row_name(rows, i)} | '
                 + ' | '.join(_cell(rows[i][c]) for c in cols) + ' |')
  if dropped:
    lines += ['', '## Dropped rows', '', '| row | reason |', '|---|---|']
    lines += [f'| {sf.row_name(rows, i)} | {why} |' for i, why in dropped]
  return '\n'.join(lines) + '\n'


def _cell(v) -> str:
  try:
    x = float(v)
  except (TypeError, ValueError):
    return '' if v is None else str(v)
  return v if x.is_integer() and abs(x) < 1e6 else fmt(x, 4)


FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a script: experiments.scaling imports this module for `analyse`."""
  flags.DEFINE_string('out', '', 'Output folder (default: the CSV\'s folder).')
  flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples (0: none).')
  flags.DEFINE_float('huber_delta', 1e-3, 'Huber δ on log loss.')
  flags.DEFINE_enum('grid', 'hoffmann', ['hoffmann', 'coarse'], 'Approach-3 starts.')
  flags.DEFINE_integer('max_starts', 100, 'L-BFGS from this many best starts (0: all).')
  flags.DEFINE_list('budgets', [], 'Extra budgets (FLOPs) for compute-optimal N, D, loss.')
  flags.DEFINE_integer('seed', 0, 'Bootstrap seed.')
  flags.DEFINE_float('budget_tolerance', sf.BUDGET_TOLERANCE,
                     'Runs whose C differ by at most this fraction (0.1: a factor 1.1, 0.095 '
                     'in ln C) are one IsoFLOP budget; 0: equal C only.')


def main(argv):
  if len(argv) != 2:
    print('usage: python -m experiments.scaling_fit runs.csv [--out=DIR]', file=sys.stderr)
    sys.exit(2)
  path = pathlib.Path(argv[1])
  try:
    rows = read_runs(path)
    try:
      budgets = [float(b) for b in FLAGS.budgets]
    except ValueError:
      raise FitError(f'--budgets={",".join(FLAGS.budgets)}: expected FLOP counts') from None
    if not 0 <= FLAGS.budget_tolerance < 1:
      raise FitError(f'--budget_tolerance={FLAGS.budget_tolerance}: expected a fraction in '
                     '[0, 1)')
    analyse(rows, FLAGS.out or path.parent, delta=FLAGS.huber_delta, bootstrap=FLAGS.bootstrap,
            grid=FLAGS.grid, max_starts=FLAGS.max_starts or None, seed=FLAGS.seed,
            budgets=budgets, notes=[f'runs from {path}'],
            budget_tolerance=FLAGS.budget_tolerance)
  except (FitError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from experiments import common  # pylint: disable=g-import-not-at-top  # (jax: only here)
  define_flags()
  common.run_main(main)
