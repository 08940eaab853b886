"""XLA flags a config asks for (`xla_cpu_flags`), merged into the XLA_FLAGS environment variable.

XLA reads XLA_FLAGS when JAX first builds a backend, so `apply` must run before anything touches a
device (main.py calls it before a mode starts). A flag the environment already sets wins: a user's
own XLA_FLAGS is never overridden. Standard library only.
"""
from __future__ import annotations

import os

from vit_accel.errors import UserError


def merged(environment: str, requested: str) -> str:
  """XLA_FLAGS `environment` plus each flag of `requested` whose name it does not set yet.

  Both are whitespace-separated `--name=value` (or `--name`) lists. Raises UserError naming the
  flag when a requested one is not an XLA CPU flag (`--xla_cpu_...`): the key is for the CPU
  backend's code generation, and a typo would otherwise be ignored or abort XLA at start-up.
  """
  present = {f.split("=", 1)[0] for f in environment.split()}
  out = environment.split()
  for flag in requested.split():
    name = flag.split("=", 1)[0]
    if not name.startswith("--xla_cpu_"):
      raise UserError(f"xla_cpu_flags: {flag!r} is not an XLA CPU flag (--xla_cpu_NAME=VALUE); "
                      f"set other XLA flags in the XLA_FLAGS environment variable")
    if name not in present:
      out.append(flag)
      present.add(name)
  return " ".join(out)


def apply(config) -> None:
  """Sets os.environ['XLA_FLAGS'] to `merged(XLA_FLAGS, config.xla_cpu_flags)`. Raises UserError
  as `merged` does."""
  value = merged(os.environ.get("XLA_FLAGS", ""), str(config.get("xla_cpu_flags", "")))
  if value:
    os.environ["XLA_FLAGS"] = value
