"""Run a command as N local JAX processes wired to one coordinator: a pod on a laptop.

  python -m experiments.launch --processes=2 --devices_per_process=4 -- \
      python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=runs/x \
      --config.mesh.shape='(2,2,2)'

Each process gets JAX_COORDINATOR_ADDRESS (a free local port), JAX_NUM_PROCESSES,
JAX_PROCESS_ID, CPU collectives over gloo and `devices_per_process` fake CPU devices
(XLA_FLAGS); `common.maybe_initialize_distributed` turns these into
`jax.distributed.initialize(...)`. Output lines are prefixed with `[p<i>]`. When one
process exits non-zero (or is killed), the others are stopped (SIGTERM, then SIGKILL
after `--grace_seconds`), so nothing is left running and nothing hangs; the launcher
exits with the first failing status, or 0 when all succeed. `--timeout_seconds` bounds
the whole run.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict, port: int, processes: int, index: int, devices: int) -> dict:
  """The environment of process `index` of `processes` (coordinator on 127.0.0.1:port)."""
  env = dict(base)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
             JAX_PROCESS_ID=str(index), JAX_PLATFORMS='cpu', LAUNCH_CPU_COLLECTIVES='gloo',
             XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']))
  return env


def _pump(proc: subprocess.Popen, index: int, out) -> None:
  for line in proc.stdout:
    out.write(f'[p{index}] {line}')
    out.flush()


def launch(command: list, processes: int, devices_per_process: int, *,
           timeout_seconds: float = 0.0, grace_seconds: float = 10.0, out=sys.stdout) -> int:
  """Runs `command` as `processes` coordinated processes; returns the exit status (the
  first non-zero one, 124 on timeout)."""
  port = free_port()
  procs = []
  for i in range(processes):
    procs.append(subprocess.Popen(
        command, env=process_env(os.environ, port, processes, i, devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
  pumps = [threading.Thread(target=_pump, args=(p, i, out), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  deadline = time.time() + timeout_seconds if timeout_seconds > 0 else None
  status = None
  try:
    while status is None:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        status = failed[0] if failed[0] > 0 else 128 - failed[0]
      elif all(c == 0 for c in codes):
        status = 0
      elif deadline and time.time() > deadline:
        out.write(f'launch: timeout after {timeout_seconds:.0f}s\n')
        status = 124
      else:
        time.sleep(0.05)
  except KeyboardInterrupt:
    status = 130
  finally:
    _stop(procs, grace_seconds)
    for t in pumps:
      t.join(timeout=5)
  if status:
    out.write(f'launch: stopped all processes (exit status {status})\n')
  return status


def _stop(procs, grace_seconds: float) -> None:
  """SIGTERM every process still running (its whole group), SIGKILL after the grace."""
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  end = time.time() + grace_seconds
  for p in procs:
    try:
      p.wait(timeout=max(end - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if '--' not in argv:
    print('usage: python -m experiments.launch --processes=N --devices_per_process=D -- '
          'COMMAND ...', file=sys.stderr)
    return 2
  split = argv.index('--')
  parser = argparse.ArgumentParser(prog='experiments.launch')
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--timeout_seconds', type=float, default=0.0)
  parser.add_argument('--grace_seconds', type=float, default=10.0)
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if args.processes < 1 or args.devices_per_process < 1 or not command:
    print('error: need --processes >= 1, --devices_per_process >= 1 and a command after --',
          file=sys.stderr)
    return 2
  return launch(command, args.processes, args.devices_per_process,
                timeout_seconds=args.timeout_seconds, grace_seconds=args.grace_seconds)


if __name__ == '__main__':
  sys.exit(main())
