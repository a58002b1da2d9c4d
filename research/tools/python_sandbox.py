"""The python tool: runs model-written code in a separate, limited subprocess.

The code never runs in the host process (untrusted text is never eval/exec-ed here).
Each call:

- writes the code to `main.py` in a fresh, otherwise empty temporary directory (the
  child's working directory, removed afterwards with everything in it) and runs
  `python -I -S -` with that file as stdin: isolated mode (no PYTHON* variables, no
  user site, script directory not on sys.path) and no site-packages, so only the
  standard library;
  the environment is PATH and LANG only (no host variables);
- in the child, before exec (`preexec_fn`): a new session (the whole process group is
  killed afterwards), and `resource.setrlimit` limits: CPU seconds (SIGXCPU), address
  space (MemoryError), file size (which also bounds the captured output: stdout and
  stderr go to files, and SIGXFSZ is ignored so an over-long write fails instead of
  killing the child), processes (RLIMIT_NPROC: fork bombs), open files, no core dumps;
- namespaces, best effort: a new empty network namespace (no sockets reach anything)
  and a new mount namespace with fresh, small tmpfs over /tmp, /var/tmp and /dev/shm
  (files written there vanish with the child), via `unshare`, as root or through a
  new user namespace; `SandboxResult.isolation` lists what was applied;
- privileges: when the host runs as root, the child switches to a fresh unused
  uid/gid (one per call) before exec, if an interpreter exists that such a user can
  run (`sys.executable`, else /usr/bin/python3): so it cannot write the host's files
  or read other processes' /proc entries, and RLIMIT_NPROC applies (Linux exempts
  uid 0 from it). After the run every process of that uid is killed, so a child that
  left its process group (setsid) does not outlive the call;
- the parent waits at most `timeout_s` wall-clock seconds, then kills the group.

What this stops: runaway CPU, memory, output, files and processes; loops (timeout);
reading the host's environment variables; writing outside the temporary directory
when the uid switch applied (plain file permissions) and leaving files in the shared
temporary folders when the mount namespace applied; network access when the network
namespace applied. What it does NOT stop: it is a resource sandbox, not a security
boundary. The child still sees the host's filesystem read-only-by-permission (world-
readable files are readable), shares the kernel (a kernel bug is an escape), and,
where the uid switch or a namespace could not be made (non-root without user
namespaces, or no interpreter an unprivileged user can run), writes what the host
user may write and reaches the network. A real boundary for hostile code needs a
separate kernel or a locked-down container: gVisor/Firecracker/a VM, or at least a
seccomp-bpf syscall filter plus a pivot_root into a minimal read-only root with
cgroup limits (pids, memory, cpu), e.g. via nsjail or bubblewrap.

The tool's result is stdout (cut to `max_output_chars`) when the code exits 0, else
"error: " + the last line of stderr (e.g. "ZeroDivisionError: division by zero"), or
a timeout / limit message.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import time

MAX_CODE_CHARS = 4000
MAX_PROCESSES = 16  # processes the child's uid may have at once (when a uid is its own)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_TMPFS_DIRS = (b"/tmp", b"/var/tmp", b"/dev/shm")
_UID_RANGE = (1_500_000_000, 1_600_000_000)  # far above any real account's uid
_SYSTEM_PYTHON = "/usr/bin/python3"


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What one run produced.

  stdout, stderr: decoded text (UTF-8, bad bytes replaced), each cut to the output bound.
  returncode: the child's exit status; negative: killed by that signal; None: timed out.
  timed_out: the wall-clock limit was hit (the process group was killed).
  truncated: stdout reached the output bound.
  network_isolated: the child ran in its own empty network namespace.
  isolation: what applied, of 'network' (empty network namespace), 'mounts' (private
    tmpfs over /tmp, /var/tmp, /dev/shm) and 'uid' (a fresh unprivileged uid).
  """
  stdout: str
  stderr: str
  returncode: int | None
  timed_out: bool
  truncated: bool
  network_isolated: bool
  isolation: tuple[str, ...] = ()


def _unshare(libc, flags: int) -> bool:
  """unshare(flags), else through a new user namespace (non-root); True if done."""
  if libc.unshare(flags) == 0:
    return True
  return libc.unshare(_CLONE_NEWUSER | flags) == 0


def _private_tmp(libc) -> bool:
  """In a fresh mount namespace: mounts private, small tmpfs over the shared tmp dirs."""
  if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
    return False
  done = True
  for path in _TMPFS_DIRS:
    if os.path.isdir(path):
      done &= libc.mount(b"tmpfs", path, b"tmpfs", 0, b"size=4m,mode=1777") == 0
  return done


def _libc():
  """libc through ctypes, loaded in the parent: dlopen in the forked child of a threaded
  host could deadlock on a lock another thread held at fork time."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc if hasattr(libc, "unshare") and hasattr(libc, "mount") else None
  except OSError:
    return None


def _limits(cpu_s: int, memory_bytes: int, output_bytes: int, max_processes: int,
            isolate: bool, uid: int | None, report_fd: int):
  """The preexec_fn: runs in the forked child, after chdir, before exec."""
  libc = _libc() if isolate else None
  def apply():
    os.setsid()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited by exec: writes fail instead
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    report = b""
    if isolate and libc is not None:
      try:
        if _unshare(libc, _CLONE_NEWNET | _CLONE_NEWNS):
          report += b"n" + (b"m" if _private_tmp(libc) else b"")
        elif _unshare(libc, _CLONE_NEWNET):
          report += b"n"
      except OSError:
        pass
    if uid is not None:  # last: unshare and mount need root
      os.setgroups([])
      os.setgid(uid)
      os.setuid(uid)
      report += b"u"
    os.write(report_fd, report)  # tells the parent what applied
  return apply


def _runnable_by_anyone(path: str) -> bool:
  """Whether every directory above `path` and `path` itself are world-executable."""
  path = os.path.realpath(path)
  parts = path.split(os.sep)
  try:
    for i in range(2, len(parts) + 1):
      if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
        return False
  except OSError:
    return False
  return True


def _interpreter_and_uid(drop_privileges: bool) -> tuple[str, int | None]:
  """(python to run, uid to switch to or None): a fresh uid only as root, with a python
  an unprivileged user can run (its stdlib must be reachable too: checked on `os.__file__`
  for the host's python)."""
  if not drop_privileges or os.geteuid() != 0:
    return sys.executable, None
  if _runnable_by_anyone(sys.executable) and _runnable_by_anyone(os.path.dirname(os.__file__)):
    python = sys.executable
  elif _runnable_by_anyone(_SYSTEM_PYTHON):
    python = _SYSTEM_PYTHON
  else:
    return sys.executable, None
  return python, random.SystemRandom().randrange(*_UID_RANGE)


def _processes_of(uid: int) -> list[int]:
  """Pids of the live (not zombie) processes whose real uid is `uid`."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/status", "rb") as f:
          fields = dict(line.split(b":", 1) for line in f if b":" in line)
        if int(fields[b"Uid"].split()[0]) == uid and not fields[b"State"].strip().startswith(b"Z"):
          pids.append(int(entry))
      except (OSError, ValueError, KeyError, IndexError):
        pass
  return pids


def _kill_all(pgid: int, uid: int | None):
  """SIGKILL the child's process group and, with its own uid, every process of it."""
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  if uid is None:
    return
  for _ in range(100):  # a fork bomb forks while we kill; RLIMIT_NPROC bounds it
    pids = _processes_of(uid)
    if not pids:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.01)


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256,
               max_output_chars: int = 2000, isolate_network: bool = True,
               max_processes: int = MAX_PROCESSES,
               drop_privileges: bool = True) -> SandboxResult:
  """Runs `code` with `python -I -S` in a limited subprocess (see the module docstring).

  Args:
    code: Python source, at most MAX_CODE_CHARS characters.
    timeout_s: wall-clock limit in seconds (the CPU limit is this, rounded up, + 1).
    memory_mb: address-space limit of the child in MiB (MemoryError past it).
    max_output_chars: stdout and stderr are each read up to this many characters
      (bytes written past 4x this are refused by the file-size limit).
    isolate_network: try the network and mount namespaces (see `SandboxResult.isolation`).
    max_processes: RLIMIT_NPROC of the child. Linux counts it per uid and exempts root:
      it bounds the child's own processes only with the uid switch; without it the
      limit is this many more than the host user's current processes.
    drop_privileges: as root, run the child as a fresh unprivileged uid when possible.

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
  python, uid = _interpreter_and_uid(drop_privileges)
  if uid is None and os.geteuid() != 0:  # per-user count: leave room above the present
    max_processes += len(_processes_of(os.getuid()))
  # The host pid in the name tells whose call a leftover folder came from.
  with tempfile.TemporaryDirectory(prefix=f"tool_python_{os.getpid()}_") as tmp:
    main = os.path.join(tmp, "main.py")
    with open(main, "w", encoding="utf-8") as f:
      f.write(code)
    if uid is not None:
      os.chown(tmp, uid, uid)  # the child's working directory, its only writable place
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    read_fd, write_fd = os.pipe()
    try:
      # The program comes on stdin (`python -`): the tmpfs mounted over /tmp may hide
      # the working directory's path, though the child's cwd stays in it.
      with open(out_path, "wb") as out, open(err_path, "wb") as err, open(main, "rb") as src:
        proc = subprocess.Popen(
            [python, "-I", "-S", "-"], cwd=tmp, stdin=src,
            stdout=out, stderr=err, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            close_fds=True, pass_fds=(write_fd,),
            preexec_fn=_limits(int(timeout_s) + 1, memory_mb << 20, output_bytes,
                               max_processes, isolate_network, uid, write_fd))
      os.close(write_fd)
      write_fd = -1
      timed_out = False
      try:
        proc.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      _kill_all(proc.pid, uid)  # also what the child left running in the background
      proc.wait()
      report = os.read(read_fd, 8)
    finally:
      os.close(read_fd)
      if write_fd >= 0:
        os.close(write_fd)
    stdout, truncated = _read(out_path, max_output_chars)
    stderr, _ = _read(err_path, max_output_chars, tail=True)
  isolation = tuple(name for flag, name in ((b"n", "network"), (b"m", "mounts"), (b"u", "uid"))
                    if flag in report)
  return SandboxResult(stdout, stderr, None if timed_out else proc.returncode, timed_out,
                       truncated, "network" in isolation, isolation)


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
