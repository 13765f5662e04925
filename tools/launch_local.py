"""Run a command as N cooperating JAX processes on this machine (a local stand-in for a multi-host pod).

    python -m tools.launch_local --processes 2 --devices-per-process 4 -- python -m train --config ... --workdir ...

Each child gets ``JLORA_COORDINATOR=127.0.0.1:<free port>``, ``JLORA_NUM_PROCESSES``, ``JLORA_PROCESS_ID``
and ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (CPU devices); ``train`` reads them and calls
``jax.distributed.initialize`` with gloo CPU collectives. Output lines are prefixed with ``[i]``. When a
child fails, the others are stopped after ``--grace`` seconds (JAX's own heartbeat also brings them
down); the launcher exits with the first non-zero status.
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
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()


def launch(command: list[str], processes: int, devices_per_process: int, grace: float = 30.0) -> int:
  """Starts ``processes`` copies of ``command``; returns the first non-zero exit status, else 0."""
  port = free_port()
  children = []
  for index in range(processes):
    env = dict(os.environ)
    env.update({
        "JLORA_COORDINATOR": f"127.0.0.1:{port}",
        "JLORA_NUM_PROCESSES": str(processes),
        "JLORA_PROCESS_ID": str(index),
        "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}".strip(),
        "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu"),
        "PYTHONUNBUFFERED": "1",
    })
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_pump, args=(child.stdout, f"[{index}] ", sys.stdout), daemon=True).start()
    children.append(child)
  status, failed_at = 0, None
  while any(c.poll() is None for c in children):
    for index, child in enumerate(children):
      code = child.poll()
      if code not in (None, 0) and status == 0:
        status, failed_at = code, time.monotonic()
        print(f"[launch_local] process {index} exited with status {code}; stopping the others in {grace:g}s",
              file=sys.stderr)
    if failed_at is not None and time.monotonic() - failed_at > grace:
      for child in children:
        if child.poll() is None:
          child.send_signal(signal.SIGTERM)
      failed_at = float("inf")
    time.sleep(0.1)
  for child in children:
    if child.returncode != 0 and status == 0:
      status = child.returncode
  return status


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, required=True, help="number of JAX processes (hosts) to start")
  parser.add_argument("--devices-per-process", type=int, default=1, help="CPU devices each process exposes")
  parser.add_argument("--grace", type=float, default=30.0,
                      help="seconds to wait after a failure before stopping the remaining processes")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --")
  return launch(command, args.processes, args.devices_per_process, args.grace)


if __name__ == "__main__":
  sys.exit(main())
