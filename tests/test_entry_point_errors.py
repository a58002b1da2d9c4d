"""One error path for every entry point (issue 19, kind 5: errors that are right but
buried): a bad path, preset, flag or value given to any `python -m experiments.X` or
`python -m benchmarks.X` ends in one line `error: ...` on stderr naming the flag or file,
exit status 2, nothing on stdout and nothing written — never a traceback with the good
message at its bottom (`experiments.common.run_main`, `benchmarks.common`)."""
import pathlib

import pytest

from tests.test_bad_inputs import cli, snapshot

CASES = [
    # The example: 19-25 traceback lines before the good message.
    ('benchmarks.data_pipeline', ['--corpus={tmp}/no_such_corpus', '--bench_dir={tmp}/bench'],
     'no_such_corpus'),
    ('benchmarks.data_pipeline', ['--vocab_sizes=8k', '--bench_dir={tmp}/bench'],
     '--vocab_sizes=8k'),
    ('benchmarks.data_pipeline', ['--synthetic_gb=-1', '--bench_dir={tmp}/bench'],
     '--synthetic_gb=-1'),
    ('benchmarks.train_step', ['--preset=nope'], '--preset=nope'),
    ('benchmarks.train_step', ['--preset=tiny', '--override=model.nope=3'], 'model.nope'),
    ('benchmarks.sampling', ['--compute_dtype=fp8'], 'compute_dtype'),
    ('benchmarks.tools', ['--repeats=0'], 'repeats'),
    ('benchmarks.ppo', ['--config=nope'], '--config=nope'),
    ('benchmarks.scaling_speed', ['--preset=nope'], '--preset=nope'),
    ('benchmarks.kernels', ['--only=dense,nope'], "--only=dense,nope: unknown ['nope']"),
    ('benchmarks.throughput', ['--reps=0'], '--reps'),
    ('benchmarks.bf16_loss_curves', ['--workdir={tmp}/a_file'], 'is a file'),
    # Flags absl itself refuses: one line and exit 2 as well (absl's own: two, exit 1).
    ('experiments.sample', ['--nope_flag=1'], 'nope_flag'),
    ('experiments.pretrain', ['--workdir={tmp}/w', '--nope_flag=1'], 'nope_flag'),
    ('experiments.evaluate', ['--workdir={tmp}/no_run', '--tasks=x'], 'no_run'),
    ('experiments.inspect', ['--workdir={tmp}/no_run', '--prompt=hi'], 'no_run'),
    ('experiments.scaling_fit', ['{tmp}/runs.csv', '--budget_tolerance=-1'], 'budget_tolerance'),
    ('experiments.scaling_fit', ['{tmp}/runs.csv', '--budgets=1e20,big'], '--budgets'),
]
SLOW_CASES = [  # these import torch / transformers first
    ('benchmarks.peer_torch', ['--dtypes=float32,fp8'], '--dtypes'),
    ('benchmarks.sampling_vs_hf', ['--preset=nope'], '--preset=nope'),
]


def check(tmp_path, module, args, expected):
  (tmp_path / 'a_file').write_text('not a folder')
  (tmp_path / 'runs.csv').write_text('N,D,C,loss\n' + '1e6,2e7,1.2e14,3.0\n' * 5)
  before = snapshot(tmp_path)
  code, lines = cli(module, *(a.replace('{tmp}', str(tmp_path)) for a in args))
  assert code == 2 and len(lines) == 1, (code, lines)
  assert lines[0].startswith('error: ') and expected in lines[0], lines
  assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
      'a_file', 'runs.csv']


@pytest.mark.parametrize('module, args, expected', CASES)
def test_bad_input_is_one_line_at_every_entry_point(tmp_path, module, args, expected):
  check(tmp_path, module, args, expected)


@pytest.mark.slow
@pytest.mark.parametrize('module, args, expected', SLOW_CASES)
def test_bad_input_is_one_line_in_the_peer_benchmarks(tmp_path, module, args, expected):
  check(tmp_path, module, args, expected)


def test_no_entry_point_calls_absl_app_run_directly():
  """absl entry points start through `common.run_main` (or `run_experiment`, which uses
  it): a bare `app.run` answers a bad flag with two lines and exit 1, and a user error
  with a traceback."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  bare = [p.name for p in sorted([*repo.glob('experiments/*.py'), *repo.glob('benchmarks/*.py')])
          if 'app.run(' in p.read_text() and p.name != 'common.py']
  assert not bare, bare


from tests.test_damaged_checkpoints import stage  # noqa: E402,F401  (the fixture)


@pytest.mark.parametrize('content, expected', [
    ('', '(0 non-blank lines, 0 skipped)'),
    ('{"nope": 1}\n\n{"messages": []}\n',
     "(2 non-blank lines, 2 skipped (first: {path}:1: no field 'messages' (fields: nope)))"),
])
def test_sft_jsonl_without_conversations_is_one_line_naming_the_file(stage, tmp_path, content,
                                                                      expected):
  path = tmp_path / 'convs.jsonl'
  path.write_text(content)
  code, lines = cli('experiments.sft', '--config=configs/sft.py:test', f'--init={stage}',
                    f'--workdir={tmp_path / "w"}', '--config.data.weights.jsonl=1.0',
                    f'--config.data.jsonl_path={path}', '--config.data.on_error=skip',
                    '--config.data.seq_len=32')
  assert code == 2 and len(lines) == 1, lines
  assert lines[0] == (f'error: data.jsonl_path={path}: no conversations '
                      + expected.format(path=path)), lines
  assert not (tmp_path / 'w').exists()
