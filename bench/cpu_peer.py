"""Our train step against the same model in PyTorch + timm, side by side on this CPU.

  python bench/cpu_peer.py --peer_python=/path/to/python-with-torch-and-timm
  python bench/cpu_peer.py --tiny            # seconds: checks the code path
  python bench/cpu_peer.py --ours_xla_flags="--xla_cpu_experimental_ynn_fusion_type= ..."

The step: symmetric MoCo-v3 (Chen et al. 2021) on the embedded default's ViT (width 128, depth 4, 4
heads, patch 4 on 32 px, MLP ratio 4, CLS token without a position embedding), projector 3 layers /
predictor 2 layers of 1024 hidden units to 256, momentum encoder, InfoNCE at temperature 0.2, AdamW
with weight decay: forward and backward of both views through the online network, forward of both
through the momentum copy, the optimiser and EMA updates. Ours is the compiled `--mode=cost` step
(vit_accel/cost_table.py, under the recipe's `xla_cpu_flags` as main.py runs it); the peer is timm's VisionTransformer (scaled-dot-product attention) with
the same heads written in PyTorch, eager, float32, every core (torch.set_num_threads). Strategies:
full length, and random 25% token keep on both branches (the peer gathers the same number of
tokens after the position embedding, as ours does).

The two run in separate processes, one after the other, `--rounds` times alternately (ours, peer,
ours, peer, ...), so neither competes with the other for cores and slow drift hits both; reported:
the median over rounds of each process's median step time, and peer ms / our ms (>= 1: ours is at
least as fast). --ours_xla_flags adds a third process per round, ours under those XLA flags (on top
of the environment's XLA_FLAGS), with its own columns: XLA's CPU flags change which kernels run the
matmuls and fusions, and are measured here rather than assumed. torch and timm are not requirements of vit-accel: the peer runs with
`--peer_python` (default: this Python) where they import, and the report says so where they do not.
Output: bench/results/cpu_peer.{md,json}.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import child  # noqa: E402  (bench/child.py)

STRATEGIES = {"full": 1.0, "keep0.25|keep0.25": 0.25}


def model_spec(tiny: bool) -> dict:
  if tiny:
    return dict(image=32, patch=8, width=32, depth=1, heads=2, mlp=4.0, hidden=64, out=32)
  return dict(image=32, patch=4, width=128, depth=4, heads=4, mlp=4.0, hidden=1024, out=256)


# ------------------------------------------------------------------------------------- ours
def measure_ours(spec: dict, batch: int, repeats: int) -> dict:
  sys.path.insert(0, ROOT)
  from configs import fmnist_mocov3
  from vit_accel import cost_table, xla_flags
  c = fmnist_mocov3.get_config()
  xla_flags.apply(c)   # the recipe's xla_cpu_flags, as main.py applies them
  c.batch_size = batch
  c.model.image_size, c.model.patch_size = spec["image"], spec["patch"]
  c.model.width, c.model.depth, c.model.num_heads = spec["width"], spec["depth"], spec["heads"]
  c.model.mlp_ratio = spec["mlp"]
  c.mocov3.proj_hidden_dim = c.mocov3.pred_hidden_dim = spec["hidden"]
  c.mocov3.out_dim = spec["out"]
  c.compile_cache_dir = ""
  c.compression.cost_candidates = tuple(s for s in STRATEGIES if s != "full")
  c.compression.cost_repeats = repeats
  rows = cost_table.measure(c)
  return {r["strategy"]: r["ms_per_step"] for r in rows}


# ------------------------------------------------------------------------------------- peer
def measure_peer(spec: dict, batch: int, repeats: int) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import timm_peer
  return timm_peer.measure(spec, batch, repeats, STRATEGIES, device="cpu", dtype="float32",
                           compile_model=False)


# ---------------------------------------------------------------------------- orchestration
def run_role(python: str, role: str, args, xla_flags: str = "") -> dict | str:
  """Runs one measurement in a fresh process (with `xla_flags` added to XLA_FLAGS); its result
  dict, or the error's last line."""
  cmd = [python, os.path.abspath(__file__), f"--role={role}", f"--batch={args.batch}",
         f"--repeats={args.repeats}"] + (["--tiny"] if args.tiny else [])
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  if xla_flags:
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
  return child.run(cmd, env=env, cwd=ROOT)


def markdown(res: dict) -> str:
  lines = ["# Our train step vs PyTorch + timm on this CPU", "",
           f"Machine: {res['machine']}. Date: {res['date']}. Command: `{res['command']}`.", "",
           f"Symmetric MoCo-v3 step, {res['model']}, batch {res['batch']}, float32; median over "
           f"{res['rounds']} alternating rounds of each process's median of {res['repeats']} "
           f"steps. Peer: {res.get('peer_versions') or 'not run'}.", ""]
  if res.get("peer_error"):
    lines += [f"Peer not measured: {res['peer_error']}", ""]
  flagged = res.get("ours_flagged") or {}
  if flagged:
    lines += [f"`ours + flags` = our step with XLA_FLAGS `{res['ours_xla_flags']}` added.", ""]
  head = "| strategy | ours ms/step | peer ms/step | peer / ours |"
  rule = "|---|---:|---:|---:|"
  if flagged:
    head += " ours + flags ms/step | peer / (ours + flags) |"
    rule += "---:|---:|"
  lines += [head, rule]

  def ms(v):
    return f"{v:.1f}" if v else "n/a"

  def ratio(peer, ours):
    return f"{peer / ours:.2f}x" if peer and ours else "n/a"
  for name in STRATEGIES:
    ours, peer = res["ours"].get(name), res["peer"].get(name)
    cell = name.replace("|", "\\|")
    row = f"| {cell} | {ms(ours)} | {ms(peer)} | {ratio(peer, ours)} |"
    if flagged:
      row += f" {ms(flagged.get(name))} | {ratio(peer, flagged.get(name))} |"
    lines.append(row)
  return "\n".join(lines) + "\n"


def main():
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--peer_python", default=sys.executable,
                 help="A Python where torch and timm import (default: this one).")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--tiny", action="store_true", help="A tiny model and batch: the code path.")
  p.add_argument("--ours_xla_flags", default="",
                 help="Also time our step with these XLA flags added (a third process per round).")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
  p.add_argument("--role", choices=("ours", "peer"), help=argparse.SUPPRESS)
  args = p.parse_args()
  spec = model_spec(args.tiny)
  if args.role:
    fn = measure_ours if args.role == "ours" else measure_peer
    child.emit(fn(spec, args.batch, args.repeats))
    return

  ours_rounds, flagged_rounds, peer_rounds, peer_error, versions = [], [], [], None, None
  for i in range(args.rounds):
    ours = run_role(sys.executable, "ours", args)
    if isinstance(ours, str):
      sys.exit(f"error: our step failed: {ours}")
    ours_rounds.append(ours)
    if args.ours_xla_flags:
      flagged = run_role(sys.executable, "ours", args, args.ours_xla_flags)
      if isinstance(flagged, str):
        sys.exit(f"error: our step with XLA_FLAGS {args.ours_xla_flags!r} failed: {flagged}")
      flagged_rounds.append(flagged)
    if peer_error is None:
      peer = run_role(args.peer_python, "peer", args)
      if isinstance(peer, str):
        peer_error = peer
      else:
        versions = peer.pop("_versions")
        peer_rounds.append(peer)
    print(f"round {i + 1}: ours {ours}"
          + (f", ours + flags {flagged_rounds[-1]}" if flagged_rounds else "")
          + (f", peer {peer_rounds[-1]}" if peer_rounds else ""), flush=True)

  def med(rounds):
    return {k: statistics.median(r[k] for r in rounds) for k in STRATEGIES} if rounds else {}

  res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{platform.processor() or 'cpu'}",
         "date": time.strftime("%Y-%m-%d"),
         "command": "python bench/cpu_peer.py " + " ".join(sys.argv[1:]),
         "model": ("ViT w{width} d{depth} h{heads} patch {patch} on {image}px, heads "
                   "{hidden}->{out}").format(**spec),
         "batch": args.batch, "repeats": args.repeats, "rounds": args.rounds,
         "ours": med(ours_rounds), "peer": med(peer_rounds), "peer_versions": versions,
         "peer_error": peer_error, "ours_rounds": ours_rounds, "peer_rounds": peer_rounds,
         "ours_xla_flags": args.ours_xla_flags, "ours_flagged": med(flagged_rounds),
         "ours_flagged_rounds": flagged_rounds}
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, "cpu_peer" + ("_tiny" if args.tiny else ""))
  with open(stem + ".json", "w") as f:
    json.dump(res, f, indent=1)
  text = markdown(res)
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text, flush=True)


if __name__ == "__main__":
  main()
