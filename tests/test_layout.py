"""The layout rules of experiments/, checked on the source: a stage never reaches into
another stage, reports are rebuilt from files, and stage files stay short."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / 'experiments'
# Modules every experiment may use: the edges (flags, errors, logging) and the loop.
SHARED = {'common', 'loop'}
# Those that run other stages (the whole pipeline and the studies): only they may
# import a stage, and only its public entry points and constants.
CALLERS = {'pipeline', 'compare_objectives', 'compare_rlhf', 'scaling', 'rlhf'}
ENTRY_POINTS = {'train', 'run', 'finetune', 'main', 'load_session', 'analyse'}
MAX_LINES = 450


def _modules():
  return {p.stem: p for p in sorted(EXPERIMENTS.glob('*.py')) if p.stem != '__init__'}


def _experiment_uses(path: pathlib.Path) -> list[tuple[str, str, int]]:
  """(module, name, line) for each name used of another experiments module: `m.x` after
  `from experiments import m [as a]`, and x in `from experiments.m import x`."""
  tree = ast.parse(path.read_text())
  aliases, uses = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == 'experiments':
      aliases.update({n.asname or n.name: n.name for n in node.names})
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('experiments.'):
      uses += [(node.module.split('.', 1)[1], n.name, node.lineno) for n in node.names]
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
        node.value.id in aliases:
      uses.append((aliases[node.value.id], node.attr, node.lineno))
  return uses


def _imported(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == 'experiments':
      out |= {n.name for n in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('experiments.'):
      out.add(node.module.split('.', 1)[1])
    elif isinstance(node, ast.Import):
      out |= {n.name.split('.', 1)[1] for n in node.names if n.name.startswith('experiments.')}
  return out


def layout_violations(modules: dict) -> list[str]:
  """Every broken rule, one line each (empty: the layout holds)."""
  problems = []
  stages = {m for m in modules if m not in SHARED and not m.endswith('_report')}
  for name, path in modules.items():
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
      problems.append(f'{path.name}: {lines} lines (at most {MAX_LINES})')
    imported = _imported(path)
    if name.endswith('_report'):
      for other in imported & stages:
        problems.append(f'{path.name} imports the stage {other}: a report reads run files')
    for other in sorted(imported & stages - {name}):
      if name not in CALLERS and not other.endswith('_report'):
        problems.append(f'{path.name} imports the stage {other} (only {sorted(CALLERS)} may)')
    for module, attr, line in _experiment_uses(path):
      if module == name:
        continue
      if attr.startswith('_'):
        problems.append(f'{path.name}:{line} uses the private {module}.{attr}')
      elif module in stages and not (attr in ENTRY_POINTS or attr.isupper() or
                                     attr.endswith('Error')):
        problems.append(f'{path.name}:{line} uses {module}.{attr}, not an entry point of the '
                        'stage')
  return problems


def test_experiments_keep_the_layout():
  assert layout_violations(_modules()) == []


@pytest.mark.parametrize('source, expected', [
    ('from experiments import pretrain\nx = pretrain._Stop()\n', 'uses the private'),
    ('from experiments import pretrain\nx = pretrain.prepare({}, None)\n', 'not an entry point'),
    ('from experiments import reward_model\n', 'imports the stage reward_model'),
    ('import experiments.sft\n', 'imports the stage sft'),
    ('x = 1\n' * (MAX_LINES + 1), 'lines (at most'),
])
def test_layout_check_catches_each_kind(tmp_path, source, expected):
  """The check itself fails on each kind of violation (here in a new stage `newstage`)."""
  modules = _modules()
  (tmp_path / 'newstage.py').write_text(source)
  modules['newstage'] = tmp_path / 'newstage.py'
  found = layout_violations(modules)
  assert any(expected in p and 'newstage' in p for p in found), found


def test_every_entry_point_imports_into_one_process():
  """Tests and other modules import entry points side by side: absl flags defined at
  import time by two of them under one name (e.g. --workdir in sample and evaluate) raise
  DuplicateFlagError in whichever test imports the second. Flags of programs are defined
  in their `__main__` (or via run_experiment), never at import."""
  modules = sorted(f'{pkg}.{p.stem}' for pkg in ('experiments', 'benchmarks')
                   for p in (REPO / pkg).glob('*.py') if p.stem != '__init__')
  code = ('import importlib, sys\n'
          f'for m in {modules!r}:\n'
          '  importlib.import_module(m)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
