"""Hostile inputs to every tool: each is refused (an "error: ..." result the model reads)
or stopped within its limits, and the host process is unharmed: same pid, same resource
limits, same environment, no files left in the temporary folders or the working
directory, no process of the sandbox left running.

In-process tools (calculator, search, the call parser and schema) take many inputs
cheaply; the python sandbox starts a subprocess per input, so it gets a few, each with a
~1 s limit.
"""
import json
import os
import re
import resource
import socket
import tempfile

import pytest

from research.tools import python_sandbox
from research.tools import registry
from research.tools import search as search_lib

DOCS = [("Apollo", "The first moon landing was in 1969. Astronauts walked on the moon."),
        ("Bread", "Bake the bread at a high temperature. Bread needs flour, water and salt."),
        ("Präsident", "Der Präsident sprach über 中文 und ünïcödé text.")]


# The per-call uids this process's sandbox calls were given: only their processes count,
# so tests running the sandbox in parallel workers (pytest -n) do not see each other's.
_OUR_UIDS = set()


@pytest.fixture(autouse=True)
def record_uids(monkeypatch):
  pick = python_sandbox._interpreter_and_uid  # pylint: disable=protected-access

  def recorded(*args, **kwargs):
    python, uid = pick(*args, **kwargs)
    _OUR_UIDS.add(uid)
    return python, uid
  monkeypatch.setattr(python_sandbox, "_interpreter_and_uid", recorded)


def _sandbox_processes() -> list[int]:
  """Live processes running as one of the per-call uids of this process's sandbox calls
  (whoever their parent is now: an orphan re-parented to init still counts)."""
  return [pid for pid, uid in _uids() if uid in _OUR_UIDS]


def _uids():
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/status", "rb") as f:
          fields = dict(line.split(b":", 1) for line in f if b":" in line)
        if not fields[b"State"].strip().startswith(b"Z"):
          yield int(entry), int(fields[b"Uid"].split()[0])
      except (OSError, KeyError, ValueError):
        pass


def _host_state():
  tmp = tempfile.gettempdir()
  return dict(
      pid=os.getpid(), cwd=os.getcwd(),
      env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
      cwd_files=sorted(os.listdir(".")),
      tmp_files=sorted(f for f in os.listdir(tmp)
                       if f.startswith((f"tool_python_{os.getpid()}_", "pwn"))),
      limits={r: resource.getrlimit(getattr(resource, r))
              for r in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE",
                        "RLIMIT_NOFILE")})


@pytest.fixture(scope="module")
def tools():
  index = search_lib.SearchIndex(DOCS, use_cache=False)
  return registry.default_tools(index, python_timeout_s=1, python_memory_mb=128)


@pytest.fixture(autouse=True)
def host_unharmed():
  before = _host_state()
  yield
  after = _host_state()
  assert after == before
  assert _sandbox_processes() == []


def call(tools, name, arguments, **kw):
  return registry.run_call(json.dumps({"name": name, "arguments": arguments}), tools, **kw)


# ----------------------------------------------------------------------------
# Calculator: 50 hostile expressions, all refused.

CALCULATOR_HOSTILE = [
    "__import__('os').system('id')", "().__class__.__bases__[0].__subclasses__()",
    "(1).__class__", "pi.real", "e.__class__", "open('/etc/passwd')", "exec('1')",
    "eval('1+1')", "getattr(1, 'real')", "globals()", "__builtins__", "import os",
    "lambda: 1", "(lambda x: x)(1)", "[x for x in range(10)]", "{x for x in (1, 2)}",
    "sum(x for x in (1, 2))", "{1: 2}", "[1] * 10", "'a' * 3", "b'x'", "f'{1}'", "1j",
    "...", "None", "True + 1", "x := 1", "1 if 1 else 2", "1; 2", "1 < 2",
    "9 ** 9 ** 9", "10 ** 100000", "2 ** 100000 // 3", "factorial(100000)",
    "exp(1000)", "1e308 * 10", "sqrt(-1)", "log(0)", "1 / 0", "1 % 0",
    "(" * 150 + "1" + ")" * 150, "-" * 199 + "1", "1 + " * 60 + "1", "1" * 500,
    "٣ + ٤", "２ + ３", "π * 2", "1\x00 + 2", "sqrt(x=4)", "max(" + "1, " * 80 + "1)",
]


@pytest.mark.parametrize("expression", CALCULATOR_HOSTILE)
def test_calculator_refuses(tools, expression):
  result = call(tools, "calculator", {"expression": expression})
  assert not result.ok and result.result.startswith("error: ")
  assert len(result.result) <= 1000


# ----------------------------------------------------------------------------
# The call itself: malformed, oversized, nested, wrong names and types.

CALL_HOSTILE = [
    "[" * 100_000 + "]" * 100_000, '{"name": "calculator", "arguments": ' + "[" * 5000,
    "x" * 9000, "", "null", "[]", '"calculator"', "NaN", '{"name": "calculator"}',
    '{"name": "calculator", "arguments": {"expression": NaN}}',
    '{"name": "calculator", "arguments": {"expression": Infinity}}',
    '{"name": 1, "arguments": {}}', '{"name": "calculator", "arguments": []}',
    '{"name": "calculator", "arguments": {}, "extra": 1}',
    '{"name": "os.system", "arguments": {"command": "id"}}',
    '{"name": "__import__", "arguments": {"name": "os"}}',
    '{"name": "calculator", "arguments": {"expression": 12}}',
    '{"name": "calculator", "arguments": {"expression": "1", "x": 1}}',
    '{"name": "calculator", "arguments": {"expression": "' + "1+" * 3000 + '1"}}',
    '{"name": "calculator", "arguments": {"expression": "\\ud800"}}',
    '{"name": "python", "arguments": {"code": 5}}',
    '{"name": "python", "arguments": {"code": "' + "#" * 5000 + '"}}',
    "{'name': 'calculator', 'arguments': {}}",
]


@pytest.mark.parametrize("text", CALL_HOSTILE, ids=lambda t: t[:30])
def test_malformed_calls_become_errors(tools, text):
  result = registry.run_call(text, tools)
  assert not result.ok and result.result.startswith("error: ")


# ----------------------------------------------------------------------------
# Search: odd queries are bounded or refused; nothing is executed.

SEARCH_REFUSED = [
    {"query": ""}, {"query": "x" * 500}, {"query": "moon", "k": 0},
    {"query": "moon", "k": 100}, {"query": "moon", "k": "3"}, {"query": "moon", "k": 2.5},
    {"query": "moon", "k": True}, {"query": ["moon"]}, {"query": None}, {},
    {"query": "moon", "path": "/etc/passwd"},
]
SEARCH_ODD = [
    " ", ".*+?[](){}|^$\\", "'; DROP TABLE passages; --", "../../etc/passwd",
    "Präsident ünïcödé", "中文", "🌕 moon 🌕", "\u202emoon", "moon\x00landing",
    "__import__('os')", "moon " * 39,
]


@pytest.mark.parametrize("arguments", SEARCH_REFUSED, ids=lambda a: ascii(a)[:40])
def test_search_refuses_bad_arguments(tools, arguments):
  result = call(tools, "search", arguments)
  assert not result.ok and result.result.startswith("error: arguments")


@pytest.mark.parametrize("query", SEARCH_ODD, ids=lambda q: ascii(q)[:40])
def test_search_odd_queries_give_bounded_results(tools, query):
  result = call(tools, "search", {"query": query})
  assert result.ok and len(result.result) <= 1000
  assert result.result == "no results" or result.result.startswith("[1] ")


def test_search_finds_non_ascii(tools):
  assert call(tools, "search", {"query": "ünïcödé"}).result.startswith("[1] Präsident: ")


# ----------------------------------------------------------------------------
# Python sandbox: each hostile program is stopped or refused inside the child.


@pytest.fixture(scope="module")
def isolation():
  return python_sandbox.run_python("print(1)", timeout_s=2).isolation


PYTHON_STOPPED = [
    # (id, code, the error the model reads)
    ("infinite loop", "while True:\n  pass", "timed out after 1 s"),
    ("sleeping loop", "import time\nwhile True: time.sleep(0.1)", "timed out after 1 s"),
    ("memory bomb", "x = bytearray(1 << 30)", "MemoryError"),
    ("growing list", "x = []\nwhile True: x.append('y' * 10**6)", "MemoryError"),
    ("huge power", "print(len(str(9 ** 9 ** 9)))", "timed out|MemoryError|ValueError"),
    ("recursion", "def f(): f()\nf()", "RecursionError"),
    ("no numpy", "import numpy", "ModuleNotFoundError"),
    ("no project", "import research", "ModuleNotFoundError"),
]


@pytest.mark.parametrize("code, error", [p[1:] for p in PYTHON_STOPPED],
                         ids=[p[0] for p in PYTHON_STOPPED])
def test_python_is_stopped(tools, code, error):
  result = call(tools, "python", {"code": code}, timeout_s=10)
  assert not result.ok
  assert re.search(error, result.result), result.result


def test_python_fork_bomb_is_bounded(tools, isolation):
  code = ("import os\nn = 0\nwhile True:\n  try:\n    os.fork()\n    n += 1\n"
          "  except OSError:\n    break")
  if "uid" not in isolation and os.geteuid() == 0:
    pytest.skip("as root without a uid switch RLIMIT_NPROC does not apply: not run")
  r = python_sandbox.run_python(code, timeout_s=1, max_processes=8)
  assert r.returncode is not None or r.timed_out  # ended; the fixture checks none is left


def test_python_output_is_cut(tools):
  result = call(tools, "python", {"code": "while True: print('y' * 1000)"}, timeout_s=10)
  assert result.ok and result.result.endswith("...[truncated]") and len(result.result) == 1000


def test_python_cannot_reach_the_host(tools, isolation, monkeypatch):
  monkeypatch.setenv("TOOLS_HOSTILE_SECRET", "s3cret")
  code = f"""
import os, socket, sys
print(os.environ.get('TOOLS_HOSTILE_SECRET'), sorted(os.environ))
for path in ['/tmp/pwn_{os.getpid()}', '/var/tmp/pwn_{os.getpid()}', '/dev/shm/pwn_{os.getpid()}',
             '{os.getcwd()}/pwn_{os.getpid()}', os.path.expanduser('~/pwn_{os.getpid()}')]:
  try:
    open(path, 'w').write('x')
    print('wrote', path)
  except OSError as e:
    print('refused', path)
try:
  os.kill({os.getpid()}, 0)
  print('can signal the host')
except OSError:
  print('cannot signal the host')
try:
  print(open('/proc/{os.getpid()}/environ', 'rb').read()[:10])
except OSError:
  print('cannot read the host environment')
"""
  r = python_sandbox.run_python(code, timeout_s=2)
  lines = r.stdout.splitlines()
  assert lines[0] == "None ['LANG', 'PATH']"  # no inherited environment
  if "uid" in isolation:
    assert lines[-2:] == ["cannot signal the host", "cannot read the host environment"]
    assert all(line.startswith("refused") for line in lines[1:6]
               if "/tmp/" not in line and "/shm/" not in line)
  # Written or not, nothing is left behind: the autouse fixture checks the host's tmp dir
  # and cwd, and these paths directly.
  for path in ("/tmp", "/var/tmp", "/dev/shm", os.getcwd(), os.path.expanduser("~")):
    assert not os.path.exists(f"{path}/pwn_{os.getpid()}")


def test_python_sockets_reach_nothing(isolation):
  if "network" not in isolation:
    pytest.skip("no network namespace here: sockets are not stopped")
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = (f"import socket\ns = socket.socket()\ns.settimeout(0.5)\n"
            f"try:\n  s.connect(('127.0.0.1', {port}))\n  print('connected')\n"
            f"except OSError:\n  print('refused')\n"
            f"try:\n  socket.create_connection(('8.8.8.8', 53), timeout=0.5)\n  print('out')\n"
            f"except OSError:\n  print('no route')")
    assert python_sandbox.run_python(code, timeout_s=2).stdout.splitlines() == [
        "refused", "no route"]


def test_python_background_process_does_not_outlive_the_call(isolation):
  if "uid" not in isolation:
    pytest.skip("without its own uid a setsid child can escape the process-group kill")
  code = ("import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(60)\n"
          "print('parent exits')")
  assert python_sandbox.run_python(code, timeout_s=2).stdout == "parent exits\n"
  assert _sandbox_processes() == []
