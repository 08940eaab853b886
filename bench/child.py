"""One measurement in a fresh process: the benchmarks' way to time something that must own the
process (a JAX backend with its own XLA_FLAGS, PyTorch beside JAX, a GPU before JAX takes it).

The child prints one line `RESULT <json>` (emit); the parent runs it (run) and gets that object,
or the reason there was none: the last line of the child's stderr.
"""
from __future__ import annotations

import json
import subprocess

PREFIX = "RESULT "


def emit(result) -> None:
  """The child's answer: one `RESULT <json>` line on stdout."""
  print(PREFIX + json.dumps(result), flush=True)


def run(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
        timeout: float | None = None) -> dict | str:
  """Runs `cmd` to completion (killed after `timeout` seconds, if given); the object of its last
  `RESULT` line, else (a str) its stderr's last line, at most 300 characters ('no output' when it
  printed nothing; 'timed out after N s'; 'cannot start ...' when the program cannot be run)."""
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
  except subprocess.TimeoutExpired:
    return f"timed out after {timeout:g} s"
  except OSError as e:   # no such interpreter, not executable
    return f"cannot start {cmd[0]}: {e.strerror or e}"
  for line in reversed(done.stdout.splitlines()):
    if line.startswith(PREFIX):
      return json.loads(line[len(PREFIX):])
  return (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
