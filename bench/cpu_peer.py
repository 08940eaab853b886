"""Our train step against the same model in PyTorch + timm, side by side on this CPU.

  python bench/cpu_peer.py --peer_python=/path/to/python-with-torch-and-timm
  python bench/cpu_peer.py --tiny            # seconds: checks the code path
  python bench/cpu_peer.py --ours_xla_flags="--xla_cpu_experimental_ynn_fusion_type= ..."
  python bench/cpu_peer.py --products        # the step's matrix products alone, both libraries

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

--products times the step's dense matrix products one by one instead, in both libraries,
alternately as above: the transformer blocks' four products (q/k/v, attention output, MLP in, MLP
out) at M = batch x tokens rows, the patch embedding, and the projector and predictor heads, each
as forward (x @ w), input gradient (dy @ w.T) and weight gradient (x.T @ dy), ours as our model
runs them (q, k, v as three products), the peer as timm's (one qkv product). Their sums, weighted
by how often the step runs each (product_shapes), say how much of a step-time gap is the matmul
kernels (XLA's Eigen vs PyTorch's oneDNN / MKL) and how much everything else (attention's batched
products, normalisation, activations, layout copies, the optimiser). Output: bench/results/cpu_peer_products.{md,json}.
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


def product_shapes(spec: dict, batch: int) -> list[dict]:
  """Every dense matrix product of the symmetric MoCo-v3 step, per strategy: [{strategy, part,
  name, kind, m, k, n, per_step, ours_parts}].

  kind: 'fwd' (m x k @ k x n), 'dx' (m x n @ (k x n).T, the input gradient) or 'dw'
  ((m x k).T @ m x n, the weight gradient); per_step: how many the step runs (two views; forward
  on the online and the momentum branch, gradients on the online one); ours_parts: how many
  products ours splits it into along n (q, k and v are three projections in our model, one fused
  qkv Linear in timm's). part: 'blocks' (the transformer blocks, m = batch x (kept + CLS)),
  'heads' (projector and predictor, m = batch) or 'patch_embed' (no input gradient; ours embeds
  the kept patches only, m = batch x kept, and the peer, as timm does, every patch of the `batch`
  images with its convolution before the token keep). The kept count is the model's (bucket-rounded, as
  compression.Strategy.layout computes it). Attention's batched products are not here."""
  sys.path.insert(0, ROOT)
  from vit_accel import compression
  width, hidden = spec["width"], int(spec["width"] * spec["mlp"])
  head_hidden, out_dim, depth = spec["hidden"], spec["out"], spec["depth"]
  both, online = 2 * 2, 2   # forwards on two branches x two views; gradients on one branch
  out = []
  for strategy in STRATEGIES:
    branches = compression.BranchStrategies.parse(strategy)
    kept = branches.query.layout(spec["image"], spec["patch"]).kept
    # One row count for both branches: the strategies here keep the same share on both.
    assert branches.key.layout(spec["image"], spec["patch"]).kept == kept, strategy

    def add(part, name, m, k, n, kinds, parts=1, times=1, **extra):
      for kind, per_step in kinds:
        out.append({"strategy": strategy, "part": part, "name": name, "kind": kind, "m": m,
                    "k": k, "n": n, "per_step": per_step * times, "ours_parts": parts, **extra})
    grads = (("fwd", both), ("dx", online), ("dw", online))
    rows = batch * (kept + 1)
    add("blocks", "qkv", rows, width, 3 * width, grads, parts=3, times=depth)
    add("blocks", "attn_out", rows, width, width, grads, times=depth)
    add("blocks", "mlp_in", rows, width, hidden, grads, times=depth)
    add("blocks", "mlp_out", rows, hidden, width, grads, times=depth)
    add("patch_embed", "patch_embed", batch * kept, spec["patch"] ** 2 * 3, width,
        (("fwd", both), ("dw", online)), image=spec["image"], patch=spec["patch"], batch=batch)
    add("heads", "proj_fc0", batch, width, head_hidden, grads)
    add("heads", "proj_fc1", batch, head_hidden, head_hidden, grads)
    add("heads", "proj_fc2", batch, head_hidden, out_dim, grads)
    online_only = (("fwd", online), ("dx", online), ("dw", online))   # no momentum predictor
    add("heads", "pred_fc0", batch, out_dim, head_hidden, online_only)
    add("heads", "pred_fc1", batch, head_hidden, out_dim, online_only)
  return out


def product_key(p: dict) -> str:
  return f"{p['strategy']} {p['name']} {p['kind']}"


def product_operands(p: dict, n: int) -> tuple[tuple, tuple]:
  """Our two operand shapes of product p with n output columns (x [m, k], a [k, n] kernel,
  dy [m, n]): fwd (x, w), dx (dy, w), dw (x, dy)."""
  return {"fwd": ((p["m"], p["k"]), (p["k"], n)), "dx": ((p["m"], n), (p["k"], n)),
          "dw": ((p["m"], p["k"]), (p["m"], n))}[p["kind"]]


def _median_ms(fn, repeats: int) -> float:
  for _ in range(3):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


def products_ours(shapes: list[dict], repeats: int, timer=None) -> dict:
  """{product_key: ms} for each product as ours runs it: flax Dense's [k, n] kernel (forward
  x @ w, input gradient dy @ w.T, weight gradient x.T @ dy), ours_parts products of n / ours_parts
  columns (one timed, times ours_parts, so its dispatch counts ours_parts times), jitted JAX under
  the recipe's XLA flags. timer(fn, repeats) -> ms: _median_ms unless given."""
  timer = timer or _median_ms
  sys.path.insert(0, ROOT)
  from configs import fmnist_mocov3
  from vit_accel import xla_flags
  xla_flags.apply(fmnist_mocov3.get_config())   # the same kernels as the training step's
  import jax
  fns = {"fwd": jax.jit(lambda a, b: a @ b), "dx": jax.jit(lambda a, b: a @ b.T),
         "dw": jax.jit(lambda a, b: a.T @ b)}
  res = {}
  for p in shapes:
    assert p["n"] % p["ours_parts"] == 0, p
    a_shape, b_shape = product_operands(p, p["n"] // p["ours_parts"])
    a = jax.random.normal(jax.random.PRNGKey(0), a_shape)
    b = jax.random.normal(jax.random.PRNGKey(1), b_shape)
    f = fns[p["kind"]]
    res[product_key(p)] = p["ours_parts"] * timer(lambda: f(a, b).block_until_ready(), repeats)
  return res


def products_peer(shapes: list[dict], repeats: int) -> dict:
  """{product_key: ms} in PyTorch (every core) as timm runs them: nn.Linear's [n, k] weight
  (forward x @ w.T, input gradient dy @ w, weight gradient dy.T @ x), one product of n columns
  each (the fused qkv), and the patch embedding as timm's stride-p convolution (conv2d forward,
  its weight gradient through torch.nn.grad.conv2d_weight); with '_versions'."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  res = {}
  with torch.no_grad():
    for p in shapes:
      m, k, n = p["m"], p["k"], p["n"]
      if p["name"] == "patch_embed":
        side, patch = p["image"], p["patch"]
        images = torch.randn(p["batch"], 3, side, side)   # timm embeds every patch
        w, dy = torch.randn(n, 3, patch, patch), torch.randn(images.shape[0], n, side // patch,
                                                             side // patch)
        f = {"fwd": lambda: torch.nn.functional.conv2d(images, w, stride=patch),
             "dw": lambda: torch.nn.grad.conv2d_weight(images, w.shape, dy, stride=patch)}[p["kind"]]
      else:
        x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        f = {"fwd": lambda: x @ w.T, "dx": lambda: dy @ w, "dw": lambda: dy.T @ x}[p["kind"]]
      res[product_key(p)] = _median_ms(f, repeats)
  res["_versions"] = f"torch {torch.__version__}"
  return res


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
  if args.products:
    role += "_products"
  cmd = [python, os.path.abspath(__file__), f"--role={role}", f"--batch={args.batch}",
         f"--repeats={args.repeats}"] + (["--tiny"] if args.tiny else [])
  if args.products:   # computed here, where vit_accel imports (the peer's Python may lack JAX)
    cmd.append("--shapes_json=" + json.dumps(product_shapes(model_spec(args.tiny), args.batch)))
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


def products_markdown(res: dict) -> str:
  """The per-product table and, per strategy and part, the products summed with their counts."""
  def cell(strategy):
    return strategy.replace("|", "\\|")
  lines = ["# The step's dense matrix products: XLA (ours) vs PyTorch on this CPU", "",
           f"Machine: {res['machine']}. Date: {res['date']}. Command: `{res['command']}`.", "",
           f"{res['model']}, batch {res['batch']}, float32; median over {res['rounds']} "
           f"alternating rounds of each process's median of {res['repeats']} calls. Peer: "
           f"{res.get('peer_versions') or 'not run'}. fwd = x @ w, dx = dy @ w.T, "
           "dw = x.T @ dy (the peer with nn.Linear's [n, k] weight: x @ w.T, dy @ w, dy.T @ x; "
           "its patch embedding as timm's stride-p convolution); per step = how many the "
           "symmetric MoCo-v3 step runs; ours runs qkv as three products of n / 3 (its q, k, v "
           "projections), timm as one. Not timed: attention's batched products, the InfoNCE "
           "logits (256 x 256 x 256, negligible) and everything that is not a matrix product.",
           ""]
  if res.get("peer_error"):
    lines += [f"Peer not measured: {res['peer_error']}", ""]
  lines += ["| strategy | product | kind | m x k x n | per step | ours ms | peer ms | peer / ours |",
            "|---|---|---|---|---:|---:|---:|---:|"]
  totals = {}
  for p in res["shapes"]:
    ours, peer = res["ours"][product_key(p)], res["peer"].get(product_key(p))
    for part in (p["part"], "all"):
      t = totals.setdefault((p["strategy"], part), [0.0, 0.0])
      t[0] += p["per_step"] * ours
      t[1] += p["per_step"] * (peer or 0.0)
    lines.append(f"| {cell(p['strategy'])} | {p['name']} | {p['kind']} | "
                 f"{p['m']} x {p['k']} x {p['n']} | {p['per_step']} | {ours:.2f} | "
                 + (f"{peer:.2f} | {peer / ours:.2f}x |" if peer else "n/a | n/a |"))
  lines += ["", "Per step (each product times its count):", "",
            "| strategy | products | ours ms | peer ms | ours - peer ms |", "|---|---|---:|---:|---:|"]
  order = ("blocks", "patch_embed", "heads", "all")
  strategies = list(STRATEGIES)
  for (strategy, part), (ours, peer) in sorted(
      totals.items(), key=lambda kv: (strategies.index(kv[0][0]), order.index(kv[0][1]))):
    lines.append(f"| {cell(strategy)} | {part} | {ours:.1f} | "
                 + (f"{peer:.1f} | {ours - peer:+.1f} |" if res["peer"] else "n/a | n/a |"))
  return "\n".join(lines) + "\n"


def products_main(args, spec: dict) -> None:
  ours_rounds, _, peer_rounds, peer_error, versions = alternate_rounds(args, "our products")
  res = {**header(args),
         "model": "ViT w{width} d{depth} h{heads} patch {patch} on {image}px".format(**spec),
         "shapes": product_shapes(spec, args.batch), "ours": median_over(ours_rounds),
         "peer": median_over(peer_rounds), "peer_versions": versions, "peer_error": peer_error,
         "ours_rounds": ours_rounds, "peer_rounds": peer_rounds}
  save(args, "cpu_peer_products", res, products_markdown(res))


def alternate_rounds(args, what: str = "our step"):
  """args.rounds rounds of: ours, ours under args.ours_xla_flags (if any), the peer (until it
  fails once). Returns (ours rounds, flagged rounds, peer rounds, the peer's error or None, the
  peer's versions); exits with an error line when ours fails."""
  ours_rounds, flagged_rounds, peer_rounds, peer_error, versions = [], [], [], None, None
  for i in range(args.rounds):
    ours = run_role(sys.executable, "ours", args)
    if isinstance(ours, str):
      sys.exit(f"error: {what} failed: {ours}")
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
  return ours_rounds, flagged_rounds, peer_rounds, peer_error, versions


def median_over(rounds: list[dict]) -> dict:
  """{key: median over rounds} ({} for no rounds)."""
  return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} if rounds else {}


def header(args) -> dict:
  return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                     f"{platform.processor() or 'cpu'}",
          "date": time.strftime("%Y-%m-%d"),
          "command": "python bench/cpu_peer.py " + " ".join(sys.argv[1:]),
          "batch": args.batch, "repeats": args.repeats, "rounds": args.rounds}


def save(args, name: str, res: dict, text: str) -> None:
  """OUT_DIR/<name>[_tiny].{json,md}, and the markdown printed."""
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, name + ("_tiny" if args.tiny else ""))
  with open(stem + ".json", "w") as f:
    json.dump(res, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text, flush=True)


def main():
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--peer_python", default=sys.executable,
                 help="A Python where torch and timm import (default: this one; --products "
                      "needs torch alone).")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--tiny", action="store_true", help="A tiny model and batch: the code path.")
  p.add_argument("--ours_xla_flags", default="",
                 help="Also time our step with these XLA flags added (a third process per round).")
  p.add_argument("--products", action="store_true",
                 help="Time the step's matrix products one by one instead of the whole step.")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
  p.add_argument("--role", choices=("ours", "peer", "ours_products", "peer_products"),
                 help=argparse.SUPPRESS)
  p.add_argument("--shapes_json", help=argparse.SUPPRESS)
  args = p.parse_args()
  spec = model_spec(args.tiny)
  if args.role:
    if args.role.endswith("_products"):
      if not args.shapes_json:
        p.error(f"--shapes_json is required with --role={args.role}")
      fn = products_ours if args.role == "ours_products" else products_peer
      child.emit(fn(json.loads(args.shapes_json), args.repeats))
    else:
      fn = measure_ours if args.role == "ours" else measure_peer
      child.emit(fn(spec, args.batch, args.repeats))
    return
  if args.products:
    if args.ours_xla_flags:
      sys.exit("error: --products times the products under the recipe's flags only; "
               "drop --ours_xla_flags")
    products_main(args, spec)
    return

  ours_rounds, flagged_rounds, peer_rounds, peer_error, versions = alternate_rounds(args)
  res = {**header(args),
         "model": ("ViT w{width} d{depth} h{heads} patch {patch} on {image}px, heads "
                   "{hidden}->{out}").format(**spec),
         "ours": median_over(ours_rounds), "peer": median_over(peer_rounds),
         "peer_versions": versions, "peer_error": peer_error, "ours_rounds": ours_rounds,
         "peer_rounds": peer_rounds, "ours_xla_flags": args.ours_xla_flags,
         "ours_flagged": median_over(flagged_rounds), "ours_flagged_rounds": flagged_rounds}
  save(args, "cpu_peer", res, markdown(res))


if __name__ == "__main__":
  main()
