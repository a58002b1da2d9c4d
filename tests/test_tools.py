"""Tool use (research/tools): calculator, schema, python sandbox, search, run_call, the
decoding runtime on a tiny random model with a scripted "model", and the SFT data.

The runtime tests force tool-call tokens through `generate_with_tools(force=...)` and
check the run against the uncached forward pass over the whole context with the
results spliced in (`sampling.greedy_uncached` and the plain training-path forward).
"""
import builtins
import functools
import json
import os
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import chat
from research import conversations
from research import model as model_lib
from research import sampling
from research import tokenizer as tokenizer_lib
from research.tools import calculator as calculator_lib
from research.tools import data as tool_data
from research.tools import python_sandbox
from research.tools import registry
from research.tools import runtime
from research.tools import schema as schema_lib
from research.tools import search as search_lib
from tests.test_tokenizer import synthetic_corpus

CALL, CALL_END = runtime.TOOL_CALL, runtime.TOOL_CALL_END
EOT = tokenizer_lib.CHAT_IDS["end_of_turn"]

# ----------------------------------------------------------------------------
# Calculator.


@pytest.mark.parametrize("expression, value", [
    ("3 * (4 + 5) / 2", "13.5"),
    ("2 ** 10", "1024"),
    ("-3 ** 2", "-9"),
    ("-(2 + 3)", "-5"),
    ("12 / 3", "4"),
    ("10 // 3", "3"),
    ("7 % 3", "1"),
    ("sqrt(16) + abs(-2)", "6"),
    ("round(2.567, 2)", "2.57"),
    ("max(1, 7, 3)", "7"),
    ("2 * pi", "6.28318530718"),
    ("9 ** 99 // 9 ** 98", "9"),
])
def test_calculator_accepts(expression, value):
  assert calculator_lib.calculator(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("2 ** 100000", "exponent"),  # refused before computing
    ("9 ** 200", "more than 100 digits"),
    ("10 ** 99 * 10 ** 99", "too large"),
    ("1e308 * 10", "not finite"),
    ("x + 1", "unknown name"),
    ("__import__('os').system('ls')", "unknown function"),
    ("open('/etc/passwd')", "unknown function"),
    ("(1).real", "Attribute is not allowed"),
    ("().__class__.__bases__", "Attribute is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("[1] * 10", "List is not allowed"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("2 if 1 else 3", "IfExp is not allowed"),
    ("1 << 1000", "LShift is not allowed"),
    ("import os", "cannot parse"),
    ("sqrt(x=4)", "positional"),
    ("sqrt(-1)", "undefined"),
    ("(-8) ** 0.5", "fractional power"),
    ("1 / 0", "division by zero"),
    ("1" * 300, "longer than 200"),
    ("1+" * 60 + "1", "more than 100 parts"),
    ("(" * 150 + "1" + ")" * 150, "longer than 200"),
])
def test_calculator_refuses(expression, reason):
  with pytest.raises(calculator_lib.CalculatorError, match=reason.replace("(", r"\(")):
    calculator_lib.calculator(expression)


def test_no_eval_or_exec_in_the_host(monkeypatch):
  """The tools parse model output; eval / exec in the host would raise here."""
  tools = registry.default_tools(search_lib.SearchIndex(TINY_DOCS))

  def refuse(*args, **kwargs):
    raise AssertionError("eval/exec called on model output")
  monkeypatch.setattr(builtins, "eval", refuse)
  monkeypatch.setattr(builtins, "exec", refuse)
  for name, args in [("calculator", {"expression": "6 * 7"}), ("search", {"query": "moon"}),
                     ("python", {"code": "print(6 * 7)"})]:
    result = registry.run_call(json.dumps({"name": name, "arguments": args}), tools)
    assert result.ok, result


# ----------------------------------------------------------------------------
# Schema and run_call.

ECHO_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 10},
        "mode": {"enum": ["upper", "lower"]},
        "times": {"type": "integer", "minimum": 1, "maximum": 3},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["text"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("arguments, error", [
    ({}, "missing required field 'text'"),
    ({"text": 5}, "arguments.text: expected string, got integer"),
    ({"text": "x" * 11}, "longer than 10"),
    ({"text": "a", "mode": "title"}, "not one of"),
    ({"text": "a", "times": True}, "expected integer, got boolean"),
    ({"text": "a", "times": 2.0}, "expected integer, got number"),
    ({"text": "a", "times": 4}, "above the maximum"),
    ({"text": "a", "tags": ["x", 1]}, r"arguments.tags\[1\]: expected string"),
    ({"text": "a", "tags": ["x", "y", "z"]}, "more than 2 items"),
    ({"text": "a", "color": "red"}, "unexpected fields"),
])
def test_schema_errors(arguments, error):
  with pytest.raises(schema_lib.SchemaError, match=error):
    schema_lib.validate(arguments, ECHO_SCHEMA)
  result = registry.run_call(json.dumps({"name": "echo", "arguments": arguments}),
                             {"echo": registry.Tool(lambda **kw: "ran", ECHO_SCHEMA)})
  assert not result.ok and result.result.startswith("error: ")


def test_schema_accepts_and_refuses_unsupported_keywords():
  schema_lib.validate({"text": "ab", "mode": "upper", "times": 3, "tags": ["x"]}, ECHO_SCHEMA)
  with pytest.raises(ValueError, match="unsupported schema keywords"):
    registry.Tool(lambda s: s, {"type": "object", "properties": {"s": {"pattern": "a+"}}})
  with pytest.raises(ValueError, match="type 'object'"):
    registry.Tool(lambda s: s, {"type": "string"})


def _raise(exception):
  raise exception


def test_run_call_errors_become_results():
  never = threading.Event()
  tools = {
      "echo": registry.Tool(lambda text: text.upper(), {
          "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
      "boom": registry.Tool(lambda: 1 / 0, {"type": "object"}),
      "quit": registry.Tool(lambda: _raise(SystemExit(3)), {"type": "object"}),
      "slow": registry.Tool(lambda: never.wait(30) and "late", {"type": "object"}),
      "long": registry.Tool(lambda: "y" * 5000, {"type": "object"}),
  }
  call = lambda name, args=None: json.dumps({"name": name, "arguments": args or {}})
  run = functools.partial(registry.run_call, tools=tools, timeout_s=0.5, max_result_chars=100)
  assert run(call("echo", {"text": "hi"})) == registry.CallResult("echo", {"text": "hi"}, "HI",
                                                                  True)
  cases = [
      ("{not json", "not valid JSON"),
      ('["echo", {}]', 'a call is {"name"'),
      ('{"name": "echo", "arguments": {"text": NaN}}', "NaN is not a JSON number"),
      ("[" * 100_000, "longer than"),
      (call("rm"), "unknown tool 'rm'"),
      (call("echo", {"text": 1}), "expected string"),
      (call("boom"), "ZeroDivisionError: division by zero"),
      (call("quit"), "SystemExit: 3"),
      (call("slow"), "slow timed out after 0.5 s"),
  ]
  try:
    for text, error in cases:
      result = run(text)
      assert not result.ok and result.result.startswith("error: ") and error in result.result, (
          text[:50], result)
  finally:
    never.set()
  long = run(call("long"))
  assert long.ok and len(long.result) == 100 and long.result.endswith("[truncated]")


# ----------------------------------------------------------------------------
# The python tool.


def test_python_runs_code_in_a_subprocess():
  assert python_sandbox.python_tool("print(sum(range(10)))") == "45"
  with pytest.raises(python_sandbox.PythonToolError, match="^ZeroDivisionError: division by zero$"):
    python_sandbox.python_tool("x = 1\nprint(x / 0)")
  out = python_sandbox.python_tool("print('a' * 100_000)", max_output_chars=50)
  assert out == "a" * 50 + "\n[output truncated at 50 characters]"


def test_python_timeout():
  with pytest.raises(python_sandbox.PythonToolError, match="timed out after 1 s"):
    python_sandbox.python_tool("while True:\n  pass", timeout_s=1)
  result = registry.run_call(json.dumps({"name": "python", "arguments": {
      "code": "import time\nwhile True: time.sleep(0.01)"}}),
      registry.default_tools(python_timeout_s=1))
  assert result.result == "error: timed out after 1 s"


def test_python_memory_limit():
  code = "x = bytearray(400 * 2**20)\nprint(len(x))"
  with pytest.raises(python_sandbox.PythonToolError, match="MemoryError"):
    python_sandbox.python_tool(code, memory_mb=128)


def test_python_cannot_touch_the_host(monkeypatch, tmp_path):
  monkeypatch.setenv("TOOLS_TEST_SECRET", "s3cret")
  monkeypatch.chdir(tmp_path)
  code = """
import os, sys
print(os.getpid())
print(os.environ.get('TOOLS_TEST_SECRET'))
os.environ['TOOLS_TEST_SECRET'] = 'changed'
open('left_behind.txt', 'w').write('x')
try:
  import research
  print('research importable')
except ImportError:
  print('no research')
try:
  import numpy
  print('numpy importable')
except ImportError:
  print('no numpy')
print(os.getcwd())
"""
  pid, secret, research, numpy, cwd = python_sandbox.python_tool(code).split("\n")
  assert int(pid) != os.getpid()
  assert secret == "None"  # the host's environment is not passed on
  assert os.environ["TOOLS_TEST_SECRET"] == "s3cret"  # nor changed
  assert research == "no research" and numpy == "no numpy"  # -I -S: stdlib only
  assert not os.path.exists(cwd) and not (tmp_path / "left_behind.txt").exists()


def test_python_network_is_isolated_when_possible():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = (f"import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"try:\n  s.connect(('127.0.0.1', {port}))\n  print('connected')\n"
            f"except OSError as e:\n  print('refused')")
    result = python_sandbox.run_python(code)
  if not result.network_isolated:
    pytest.skip("this kernel lets no network namespace be made here")
  assert result.stdout.strip() == "refused"


# ----------------------------------------------------------------------------
# Search.

TINY_DOCS = [
    ("Apollo", "The first moon landing was in 1969. Astronauts walked on the moon."),
    ("Bread", "Bake the bread at a high temperature. Bread needs flour, water and salt."),
    ("Trains", "The railway connects the cities. Trains run on time in the morning."),
    ("Mars", "A rover landed on Mars. The landing was hard, and the rover drove far."),
    ("Weather", "Rain in the morning, sun in the afternoon, and a cold night."),
    ("Tides", "The moon pulls the oceans and makes the tides."),
]


@pytest.fixture(autouse=True)
def _search_cache_in_tmp(tmp_path, monkeypatch):
  """Indexes built by tests are cached under the test's tmp folder, not the home."""
  monkeypatch.setenv("RESEARCH_CACHE", str(tmp_path / "cache"))


def test_search_ranks_a_tiny_collection():
  index = search_lib.SearchIndex(TINY_DOCS)
  titles = lambda query, k=3: [h.title for h in index.search(query, k)]
  assert titles("moon landing") == ["Apollo", "Tides", "Mars"]  # both words, then short
  assert titles("moon", k=5) == ["Apollo", "Tides"]  # only passages with a query word
  assert titles("MOON Landing") == titles("moon landing")  # case-insensitive
  assert titles("the moon", k=2) == ["Apollo", "Tides"]  # 'the' is everywhere: weak
  assert titles("bread flour")[0] == "Bread"
  assert titles("rover", k=1) == ["Mars"]
  assert titles("submarine") == []
  tool = search_lib.make_search(index, snippet_chars=20, max_chars=120)
  assert tool("submarine") == "no results"
  text = tool("moon landing")
  assert text.startswith("[1] Apollo: ") and len(text) <= 120


def test_snippet_is_bounded_and_near_the_match():
  text = "filler " * 100 + "the moon is here " + "tail " * 100
  s = search_lib.snippet(text, {"moon"}, 60)
  assert "moon" in s and len(s) <= 66 and s.startswith("...") and s.endswith("...")


# ----------------------------------------------------------------------------
# The runtime on a tiny random model.

V = 432
CFG = model_lib.TransformerConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_len=64, init_std=0.2)
MAX_NEW = 72
# Every runtime test uses one cache size (the first one grows to it) and one result bound
# (so one chunk width): the jitted steps compile once for all of them.
CACHE_LEN = 512
RESULT_TOKENS = 12


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_tokenizer(synthetic_corpus(), vocab_size=430)


def init_params(cfg, seed=0):
  """Random params drawn by numpy (compiling the model's init costs CPU-seconds)."""
  z = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), z, z, z,
                          jnp.zeros((1, 8), bool))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(0.0, cfg.init_std, leaf.value.shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == "scale" else noise
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, "value"))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, seed=1)


def call_ids(tok, name, arguments):
  """The ids a model writes for one call: <|tool_call|> JSON <|/tool_call|>."""
  text = chat.tool_call_json({"name": name, "arguments": arguments})
  return [CALL] + tok.encode_text(text) + [CALL_END]


class Script:
  """force(): row r's i-th sample is plans[r][i] (None: the model's own greedy pick)."""

  def __init__(self, plans, on_sample=None):
    self.plans = plans
    self.count = [0] * len(plans)
    self.on_sample = on_sample

  def __call__(self, row, tokens):
    if self.on_sample:
      self.on_sample(row, tokens)
    i = self.count[row]
    self.count[row] += 1
    plan = self.plans[row]
    return plan[i] if i < len(plan) else None


def prompts_of(tok):
  ask = lambda text: chat.render(tok, [{"role": "user", "content": text}],
                                 add_generation_prompt=True).ids.tolist()
  return [ask("what is 2 + 3 ?"), ask("hello"), ask("the state of the union")]


@functools.partial(jax.jit, static_argnames="cfg")
def full_logprobs(params, tokens_BxL, lengths_B, *, cfg):
  """Log-softmax of the plain (uncached) training-path forward over left-aligned rows."""
  b, l = tokens_BxL.shape
  positions = jnp.broadcast_to(jnp.arange(l), (b, l))
  segment_ids = (positions < lengths_B[:, None]).astype(jnp.int32)
  hidden, _ = model_lib.Transformer(cfg).apply({"params": params}, tokens_BxL, positions,
                                               segment_ids, jnp.zeros((b, l), bool))
  return jax.nn.log_softmax(model_lib.logits(params, hidden, cfg.compute_dtype), axis=-1)


@pytest.mark.slow
def test_resumes_from_the_cache_and_matches_the_uncached_reference(tok, params, monkeypatch):
  prompts = prompts_of(tok)
  plans = [
      call_ids(tok, "calculator", {"expression": "2 + 3"}),  # calls at once
      [],  # never calls: plain greedy
      [None] * 3 + call_ids(tok, "calculator", {"expression": "6 * 7"}),  # later
  ]
  fed_chunks = []  # (real tokens per row) of every step, counted outside the runtime
  original_step = runtime._step

  def counting_step(params, cache, tokens_BxW, positions_BxW, segment_ids_BxW, *args, **kw):
    fed_chunks.append((np.asarray(segment_ids_BxW) > 0).sum(axis=1))
    return original_step(params, cache, tokens_BxW, positions_BxW, segment_ids_BxW, *args,
                         **kw)

  monkeypatch.setattr(runtime, "_step", counting_step)
  tools = {"calculator": registry.default_tools()["calculator"]}
  max_new = 200  # enough to fill the first cache: it grows on the way
  out = runtime.generate_with_tools(params, CFG, tok, prompts, tools, max_new_tokens=max_new,
                                    eos_id=-1, force=Script(plans),
                                    max_result_tokens=RESULT_TOKENS, cache_len=CACHE_LEN // 2)
  assert out.cache_slots == CACHE_LEN
  assert [[c.result for c in calls] for calls in out.calls] == [["5"], [], ["42"]]
  assert out.finish == ["length"] * 3

  # Only the result blocks were prefilled after the prompt: per row, the positions fed
  # by multi-token chunks are the <|/tool_call|> (the unfed sampled token) plus the block.
  blocks = [runtime.result_block(tok, r, RESULT_TOKENS) for r in ("5", "42")]
  assert out.injected.tolist() == [len(blocks[0]), 0, len(blocks[1])]
  chunks_BxT = np.stack(fed_chunks, axis=1)
  prefilled = np.where(chunks_BxT > 1, chunks_BxT - 1, 0).sum(axis=1)
  assert prefilled.tolist() == out.injected.tolist()
  for r in range(3):
    assert chunks_BxT[r].sum() + len(prompts[r]) == out.fed[r] == (
        len(prompts[r]) + len(out.tokens[r]) - 1)  # nothing fed twice
    assert out.sampled[r].sum() == max_new

  # The whole context, uncached: every sampled token's log-prob, and greedy picks.
  full = [prompts[r] + out.tokens[r] for r in range(3)]
  width = max(map(len, full))
  tokens_BxL = np.zeros((3, width), np.int32)
  for r, f in enumerate(full):
    tokens_BxL[r, :len(f)] = f
  logp_BxLxV = np.asarray(full_logprobs(params, tokens_BxL, np.array(list(map(len, full))),
                                        cfg=CFG))
  for r in range(3):
    p = len(prompts[r])
    at = p + np.flatnonzero(out.sampled[r])  # positions of sampled tokens in `full`
    expected = logp_BxLxV[r, at - 1, tokens_BxL[r, at]]
    np.testing.assert_allclose(out.logprobs[r][at - p], expected, atol=2e-5)
    free = at[len(plans[r]):]  # not forced: the model's own greedy choice
    assert (tokens_BxL[r, free] == logp_BxLxV[r, free - 1].argmax(-1)).all()

  # greedy_uncached from the context up to the end of each injected result continues
  # with exactly the tokens decoded from the cache (rows 0 and 2, in one batch).
  cuts = [len(prompts[r]) + len(plans[r]) + len(blocks[i]) for i, r in enumerate((0, 2))]
  context_BxP = np.zeros((2, max(cuts)), np.int32)
  for i, (r, cut) in enumerate(zip((0, 2), cuts)):
    assert full[r][cut - len(blocks[i]):cut] == blocks[i]
    context_BxP[i, :cut] = full[r][:cut]
  rests = [full[r][cut:] for r, cut in zip((0, 2), cuts)]
  reference = np.asarray(sampling.greedy_uncached(
      params, context_BxP, np.array(cuts, np.int32), cfg=CFG,
      max_new_tokens=max(map(len, rests))))
  for i, (cut, rest) in enumerate(zip(cuts, rests)):
    assert reference[i, cut:cut + len(rest)].tolist() == rest

  # The transcript parses as chat messages: the call, its result, the next turn.
  messages = chat.parse(tok, full[0])
  assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
      {"name": "calculator", "arguments": {"expression": "2 + 3"}}]}
  assert messages[2] == {"role": "tool", "content": "5"}
  assert messages[3]["role"] == "assistant"


def test_rows_call_tools_while_others_decode(tok, params):
  """Row 0's tool blocks until row 1 has decoded 5 more tokens: a runtime that waited
  for the tool before stepping the batch would never release it."""
  released = threading.Event()
  row1 = {"sampled": 0, "at_call": None}

  def on_sample(row, tokens):
    if row == 1:
      row1["sampled"] = len(tokens)
      if row1["at_call"] is not None and len(tokens) >= row1["at_call"] + 5:
        released.set()

  def wait():
    row1["at_call"] = row1["sampled"]
    return "released" if released.wait(10) else "not released"

  tools = {"wait": registry.Tool(wait, {"type": "object"})}
  plans = [call_ids(tok, "wait", {}), [], []]
  out = runtime.generate_with_tools(params, CFG, tok, prompts_of(tok), tools,
                                    max_new_tokens=MAX_NEW, eos_id=-1,
                                    force=Script(plans, on_sample), tool_timeout_s=20,
                                    max_result_tokens=RESULT_TOKENS, cache_len=CACHE_LEN)
  assert [[c.result for c in calls] for calls in out.calls] == [["released"], [], []]


def test_call_cap_and_errors_become_results(tok, params):
  """Over-cap, malformed, unknown, failing and unopened calls all come back as results."""
  counter = []
  tools = {"calculator": registry.default_tools()["calculator"],
           "count": registry.Tool(lambda: counter.append(1) or str(len(counter)),
                                  {"type": "object"})}
  count = call_ids(tok, "count", {})
  bad_json = [CALL] + tok.encode_text('{"name": "count"') + [CALL_END]
  open_call = tok.encode_text(chat.tool_call_json({"name": "calculator",
                                                   "arguments": {"expression": "1 / 0"}}))
  prompts = prompts_of(tok)
  prompts[2] = prompts[2] + [CALL] + open_call  # the prompt ends inside an open call
  plans = [
      count + count + count,  # the third call is over the cap: not run
      bad_json + call_ids(tok, "rm", {"path": "/"}),
      [CALL_END, CALL_END],  # closes the prompt's call; then a close with no open call
  ]
  out = runtime.generate_with_tools(params, CFG, tok, prompts, tools,
                                    max_new_tokens=max(map(len, plans)) + 2, eos_id=-1,
                                    force=Script(plans), max_calls=2,
                                    max_result_tokens=RESULT_TOKENS, cache_len=CACHE_LEN)
  results = [[c.result for c in calls] for calls in out.calls]
  assert counter == [1, 1]
  assert results[0] == ["1", "2", "error: tool-call limit reached (2 per turn); "
                        "answer without tools"]
  assert results[1][0].startswith("error: the call is not valid JSON")
  assert results[1][1] == "error: unknown tool 'rm' (tools: calculator, count)"
  assert results[2] == ["error: division by zero",
                        "error: <|/tool_call|> without an opening <|tool_call|>"]
  assert out.finish == ["length"] * 3
  for r in range(3):  # every error was shown to the model as a result block
    assert out.injected[r] == sum(len(runtime.result_block(tok, c.result, RESULT_TOKENS))
                                  for c in out.calls[r])


def test_eos_stops_a_row_and_results_are_cut(tok, params):
  tools = {"long": registry.Tool(lambda: "word " * 500, {"type": "object"})}
  plans = [call_ids(tok, "long", {}) + [EOT], [EOT], [None] * 4]
  out = runtime.generate_with_tools(params, CFG, tok, prompts_of(tok), tools,
                                    max_new_tokens=MAX_NEW, force=Script(plans),
                                    max_result_chars=40, max_result_tokens=RESULT_TOKENS,
                                    cache_len=CACHE_LEN)
  assert out.finish[:2] == ["eos", "eos"] and out.tokens[1] == [EOT]
  assert len(out.calls[0][0].result) == 40
  assert out.injected[0] == len(runtime.RESULT_PREFIX) + RESULT_TOKENS + len(runtime.RESULT_SUFFIX)
  assert out.tokens[0][-1] == EOT and out.sampled[0].sum() == len(plans[0])


def test_sampling_is_seeded(tok, params):
  run = lambda seed: runtime.generate_with_tools(
      params, CFG, tok, prompts_of(tok), {}, max_new_tokens=8, eos_id=-1, temperature=1.0,
      seed=seed, max_result_tokens=RESULT_TOKENS, cache_len=CACHE_LEN)
  a, b, c = run(0), run(0), run(1)
  assert a.tokens == b.tokens and a.tokens != c.tokens
  assert all((lp < 0).all() for lp in a.logprobs)


def test_chat_session_with_tools(tok, params, monkeypatch):
  """The chat CLI's tool mode turns a runtime output into messages (the runtime is faked:
  it is tested above, and a batch of one would compile its own steps)."""
  from experiments import chat as chat_cli  # pylint: disable=g-import-not-at-top
  answer_ids = tok.encode_text("2 + 3 = 5")
  tokens = (call_ids(tok, "calculator", {"expression": "2 + 3"})
            + runtime.result_block(tok, "5", RESULT_TOKENS) + answer_ids + [EOT])
  seen = {}

  def fake_generate(params, cfg, tokenizer, prompts, tools, **kwargs):
    seen.update(prompts=prompts, tools=tools)
    return runtime.ToolGeneration([tokens], [], [], [], ["eos"], np.zeros(1), np.zeros(1), 0, 0)

  monkeypatch.setattr(runtime, "generate_with_tools", fake_generate)
  tools = {"calculator": registry.default_tools()["calculator"]}
  session = chat_cli.ChatSession(params, CFG, tok, temperature=0.0, max_new_tokens=16,
                                 tools=tools)
  shown = []
  assert session.reply("what is 2 + 3 ?", on_text=shown.append) == "2 + 3 = 5"
  assert seen["tools"] is tools and seen["prompts"] == [prompts_of(tok)[0]]
  assert session.messages[1:] == [
      {"role": "assistant", "content": "", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "2 + 3"}}]},
      {"role": "tool", "content": "5"},
      {"role": "assistant", "content": "2 + 3 = 5"}]
  assert "".join(shown) == '[calculator {"expression": "2 + 3"} -> 5]\n2 + 3 = 5'


# ----------------------------------------------------------------------------
# SFT data.


def test_calculator_conversations_render_and_parse(tok):
  convs = tool_data.calculator_word_problems(30, steps=(1, 4), seed=3, with_system=True)
  problems = conversations.word_problems(30, (1, 4), 3)
  for conv, problem in zip(convs, problems):
    conversations.check_conversation({"messages": conv})
    rendered = chat.render(tok, conv)
    assert chat.parse(tok, rendered.ids) == conv
    calls = [m for m in conv if m.get("tool_calls")]
    results = [m["content"] for m in conv if m["role"] == "tool"]
    assert len(calls) == len(results) == problem.k
    for m, result in zip(calls, results):
      assert calculator_lib.calculator(m["tool_calls"][0]["arguments"]["expression"]) == result
    final = conv[-1]["content"]
    assert conversations.answer_of_steps(final) == problem.answer
    assert conversations.final_number(final) == str(problem.answer)
    # The loss covers the calls and the answer, never the results.
    ids, mask = rendered.ids, rendered.loss_mask
    assert mask[ids == CALL].all() and mask[ids == CALL_END].all()
    assert not mask[ids == tokenizer_lib.CHAT_IDS["tool_result"]].any()
    # After each <|/tool_call|>, the rendered text is exactly what the runtime injects.
    # (up to and including the next <|assistant|> header).
    ends = np.flatnonzero(ids == CALL_END)
    headers = np.flatnonzero(ids == tokenizer_lib.CHAT_IDS["assistant"])
    for end, result in zip(ends, results):
      next_header = headers[headers > end][0]
      assert ids[end + 1:next_header + 1].tolist() == runtime.result_block(tok, result, 10**6)


@pytest.mark.slow
def test_two_calls_in_one_answer_match_a_hand_written_transcript(tok, params):
  """A scripted reply calls the calculator twice, then answers: the whole context parses
  to the expected messages, nothing is fed twice, and every sampled token's log-prob is
  the uncached forward's over the context with the results spliced in."""
  prompts = prompts_of(tok)[:1]
  answer = tok.encode_text("The answer is 20") + [EOT]
  plan = (call_ids(tok, "calculator", {"expression": "2 + 3"})
          + call_ids(tok, "calculator", {"expression": "5 * 4"}) + answer)
  tools = {"calculator": registry.default_tools()["calculator"]}
  out = runtime.generate_with_tools(params, CFG, tok, prompts, tools,
                                    max_new_tokens=len(plan) + 8,
                                    force=Script([plan]), max_result_tokens=RESULT_TOKENS,
                                    cache_len=CACHE_LEN)
  assert out.finish == ["eos"]
  full = prompts[0] + out.tokens[0]
  assert chat.parse(tok, full) == [
      {"role": "user", "content": "what is 2 + 3 ?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "2 + 3"}}]},
      {"role": "tool", "content": "5"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "5 * 4"}}]},
      {"role": "tool", "content": "20"},
      {"role": "assistant", "content": "The answer is 20"},
  ]
  blocks = [runtime.result_block(tok, r, RESULT_TOKENS) for r in ("5", "20")]
  assert out.injected[0] == sum(map(len, blocks))
  assert out.fed[0] == len(full) - 1  # prompt, tokens and blocks each written once
  assert out.sampled[0].sum() == len(plan)
  logp = np.asarray(full_logprobs(params, np.asarray([full], np.int32),
                                  np.asarray([len(full)]), cfg=CFG))[0]
  at = len(prompts[0]) + np.flatnonzero(out.sampled[0])
  np.testing.assert_allclose(out.logprobs[0][at - len(prompts[0])],
                             logp[at - 1, np.asarray(full)[at]], atol=2e-5)


def test_a_batch_where_some_rows_call_decodes_as_each_row_alone(tok, params):
  prompts = prompts_of(tok)
  plans = [call_ids(tok, "calculator", {"expression": "6 * 7"}), [],
           [None] * 5 + call_ids(tok, "calculator", {"expression": "1 + 1"})]
  tools = {"calculator": registry.default_tools()["calculator"]}
  kwargs = dict(max_new_tokens=max(map(len, plans)) + 10, eos_id=-1, max_result_tokens=RESULT_TOKENS,
                cache_len=CACHE_LEN)
  together = runtime.generate_with_tools(params, CFG, tok, prompts, tools,
                                         force=Script(plans), **kwargs)
  assert [len(c) for c in together.calls] == [1, 0, 1]
  for r in range(3):
    alone = runtime.generate_with_tools(params, CFG, tok, prompts[r:r + 1], tools,
                                        force=Script(plans[r:r + 1]), **kwargs)
    assert alone.tokens[0] == together.tokens[r]
    assert [c.result for c in alone.calls[0]] == [c.result for c in together.calls[r]]
