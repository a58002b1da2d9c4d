"""The python tool: runs model-written code in a separate, limited subprocess.

The code never runs in the host process. Each call:

- writes the code to `main.py` in a fresh temporary directory (the child's working
  directory, deleted afterwards) and runs `python -I -S main.py` (isolated mode: no
  PYTHON* variables, no user site, no site-packages, so only the standard library),
  with stdin from /dev/null and an environment of PATH and LANG only (no host secrets
  in variables);
- in the child, before exec (`preexec_fn`): a new session (so the whole process group
  is killed on timeout), and `resource.setrlimit` limits: CPU seconds, address space
  (memory), file size (which also bounds the captured output: stdout and stderr go to
  files, and SIGXFSZ is ignored so an over-long write fails instead of killing the
  child), open files, no core dumps;
- network: best effort. The child is moved into a new, empty network namespace
  (`unshare(CLONE_NEWNET)`, or a new user namespace plus network namespace for a
  non-root user) when the kernel allows it; `SandboxResult.network_isolated` says
  whether it did. Where it cannot, the child has the host's network. This is a
  resource-limited subprocess, not a security boundary against a determined attacker:
  it shares the host's filesystem with the host user's permissions (run the host as an
  unprivileged user, or inside a container, for untrusted code at scale).
- the parent waits at most `timeout_s` wall-clock seconds, then kills the process
  group.

The tool's result is stdout (cut to `max_output_chars`) when the code exits 0, else
"error: " + the last line of stderr (e.g. "ZeroDivisionError: division by zero"), or
a timeout / limit message.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import signal
import subprocess
import sys
import tempfile

MAX_CODE_CHARS = 4000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What one run produced.

  stdout, stderr: decoded text (UTF-8, bad bytes replaced), each cut to the output bound.
  returncode: the child's exit status; negative: killed by that signal; None: timed out.
  timed_out: the wall-clock limit was hit (the process group was killed).
  truncated: stdout reached the output bound.
  network_isolated: the child ran in its own empty network namespace.
  """
  stdout: str
  stderr: str
  returncode: int | None
  timed_out: bool
  truncated: bool
  network_isolated: bool


def _unshare_network() -> bool:
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) == 0:
      return True
    return libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0
  except (OSError, AttributeError):
    return False


def _limits(cpu_s: int, memory_bytes: int, output_bytes: int, isolate_network: bool,
            report_fd: int):
  """The preexec_fn: runs in the forked child, before exec."""
  def apply():
    os.setsid()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited by exec: writes fail instead
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if isolate_network and _unshare_network():
      os.write(report_fd, b"1")  # tells the parent
  return apply


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256,
               max_output_chars: int = 2000, isolate_network: bool = True) -> SandboxResult:
  """Runs `code` with `python -I -S` in a limited subprocess (see the module docstring).

  Args:
    code: Python source, at most MAX_CODE_CHARS characters.
    timeout_s: wall-clock limit in seconds (the CPU limit is this, rounded up, + 1).
    memory_mb: address-space limit of the child in MiB (MemoryError past it).
    max_output_chars: stdout and stderr are each read up to this many characters
      (bytes written past 4x this are refused by the file-size limit).
    isolate_network: try to give the child an empty network namespace.

  Returns:
    `SandboxResult`.

  Raises:
    ValueError: code too long, or not a string.
  """
  if not isinstance(code, str):
    raise ValueError(f"code must be a string, got {type(code).__name__}")
  if len(code) > MAX_CODE_CHARS:
    raise ValueError(f"code longer than {MAX_CODE_CHARS} characters ({len(code)})")
  output_bytes = 4 * max_output_chars + 4
  with tempfile.TemporaryDirectory(prefix="tool_python_") as tmp:
    main = os.path.join(tmp, "main.py")
    with open(main, "w", encoding="utf-8") as f:
      f.write(code)
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    read_fd, write_fd = os.pipe()
    try:
      with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", main], cwd=tmp, stdin=subprocess.DEVNULL,
            stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            close_fds=True, pass_fds=(write_fd,),
            preexec_fn=_limits(int(timeout_s) + 1, memory_mb << 20, output_bytes,
                               isolate_network, write_fd))
      os.close(write_fd)
      write_fd = -1
      isolated = False
      timed_out = False
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        proc.wait()
      isolated = os.read(read_fd, 1) == b"1"
    finally:
      os.close(read_fd)
      if write_fd >= 0:
        os.close(write_fd)
    stdout, truncated = _read(out_path, max_output_chars)
    stderr, _ = _read(err_path, max_output_chars, tail=True)
  return SandboxResult(stdout, stderr, None if timed_out else proc.returncode, timed_out,
                       truncated, isolated)


def _read(path: str, max_chars: int, tail: bool = False) -> tuple[str, bool]:
  """The first (or, with `tail`, last) `max_chars` characters of a file; and whether cut."""
  with open(path, "rb") as f:
    if tail:
      f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * max_chars))
    data = f.read(4 * max_chars + 8)
  text = data.decode("utf-8", errors="replace")
  cut = len(text) > max_chars
  return (text[-max_chars:] if tail else text[:max_chars]), cut


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1].strip() if lines else ""


class PythonToolError(RuntimeError):
  """The code failed, timed out or hit a limit; the message is what the model sees."""


def python_tool(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256,
                max_output_chars: int = 2000) -> str:
  """The python tool: stdout of `code` run by `run_python`, trailing whitespace removed
  (cut, with a note, if long).

  Raises:
    PythonToolError: "timed out after N s", "killed by SIGXCPU (CPU time limit)", or the
      last line of the traceback ("NameError: name 'x' is not defined").
    ValueError: code too long.
  """
  r = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb,
                 max_output_chars=max_output_chars)
  if r.truncated:  # whatever happened next (a write past the file-size limit fails)
    return r.stdout + f"\n[output truncated at {max_output_chars} characters]"
  if r.timed_out:
    raise PythonToolError(f"timed out after {timeout_s:g} s")
  if r.returncode is not None and r.returncode < 0:
    name = signal.Signals(-r.returncode).name
    why = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (killed)",
           "SIGSEGV": " (crashed)"}.get(name, "")
    raise PythonToolError(f"killed by {name}{why}")
  if r.returncode != 0:
    raise PythonToolError(_last_line(r.stderr) or f"exited with status {r.returncode}")
  return r.stdout.rstrip()


SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string", "maxLength": MAX_CODE_CHARS,
                            "description": "Python 3 code; print() the answer"}},
    "required": ["code"],
    "additionalProperties": False,
}
