"""GPU benchmark: train-step throughput and MFU of every compression strategy, at ImageNet scale.

  python bench/gpu.py --out_dir=bench/results            # on a CUDA machine, < 10 minutes
  python bench/gpu.py --tiny --out_dir=/tmp/gpu_bench    # the same code path on a CPU, in ~1 minute
  python bench/gpu.py --xla_ab --out_dir=bench/results   # XLA GPU flag sets on the ViT-B/16 step

Side by side in the same run (first, each in its own process, before JAX holds the accelerator):
the same MoCo-v3 step in PyTorch + timm (bench/timm_peer.py: bf16 autocast, torch.compile,
scaled-dot-product attention; same batch, heads and kept-token counts) where torch and timm import.
MFU is given against the datasheet peak and against the measured bf16 matmul rate.

For each model below, the MoCo-v3 train step (symmetric, both views) is compiled ahead of time per
compression strategy and timed on a synthetic uint8 batch (median of repeated steps after warm-up,
`--mode=cost`'s measurement). Reported per strategy: ms/step, images/s, measured speed-up over the
uncompressed step, the analytic cost model's speed-up, XLA's FLOP count of the compiled step, and MFU
= those FLOPs / step time / the chip's dense peak. Needs no dataset and no TensorFlow.

Models: ViT-B/16 at 224 px (bf16 compute, float32 parameters, MoCo-v3's 4096-wide heads: the recipe
configs/imagenet_mocov3_vit_b16.py) and the embedded default (configs/fmnist_mocov3.py: ViT width 128,
depth 4, patch 4 on 32 px), each at a benchmark-sized batch with the strategies below; everything else
is the recipe's. Results are written after every row (json + markdown), so a run cut short still
leaves what it measured.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import fmnist_mocov3, imagenet_mocov3_vit_b16  # noqa: E402
from vit_accel import cost_table, io  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import child  # noqa: E402  (bench/child.py)

flags.DEFINE_string("out_dir", "bench/results", "Where gpu_<device>.json / .md go.")
flags.DEFINE_bool("tiny", False, "Tiny models and batches: checks the code path on a CPU.")
flags.DEFINE_integer("vit_b_batch", 256, "Global batch of the ViT-B/16 steps.")
flags.DEFINE_integer("default_batch", 1024, "Global batch of the embedded default's steps.")
flags.DEFINE_integer("repeats", 10, "Timed steps per strategy (median reported).")
flags.DEFINE_string("rerender", "", "Only rewrite the markdown of this saved results json.")
flags.DEFINE_float("peak_tflops", 0.0, "Dense bf16 peak of the chip for MFU; 0 = from device kind.")
flags.DEFINE_bool("peer", True, "Also time the same step in PyTorch + timm (bench/timm_peer.py: "
                  "bf16 autocast, torch.compile, SDPA) where torch and timm import.")
flags.DEFINE_integer("vit_s_batch", 256, "Global batch of the ViT-S/16 steps.")
flags.DEFINE_string("peer_python", sys.executable, "The Python that runs the peer (needs torch, "
                    "timm).")
flags.DEFINE_bool("xla_ab", False, "Instead: the ViT-B/16 full-length step under each of "
                  "XLA_FLAG_SETS, each in its own process (XLA reads XLA_FLAGS once), written to "
                  "gpu_xla_flags_<device>.{json,md}.")
flags.DEFINE_list("xla_sets", [], "With --xla_ab: only these XLA_FLAG_SETS entries ('default' "
                  "always runs).")
flags.DEFINE_integer("xla_timeout_s", 300, "With --xla_ab: a set's process is stopped (and reported "
                     "as such) after this many seconds.")
flags.DEFINE_string("xla_child", "", "Internal: time one XLA_FLAG_SETS entry and print RESULT.")
FLAGS = flags.FLAGS

# XLA GPU flags that matter for transformer training (XLA's GPU flag guide, MaxText's launchers);
# each set is timed against the default in one --xla_ab run and kept only where it measures faster.
XLA_FLAG_SETS = {
    "default": "",
    "latency_hiding_scheduler": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
    "lhs+no_triton_gemm": ("--xla_gpu_enable_latency_hiding_scheduler=true "
                           "--xla_gpu_enable_triton_gemm=false"),
}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
DENSE_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops() -> float | None:
  if FLAGS.peak_tflops > 0:
    return FLAGS.peak_tflops
  kind = jax.devices()[0].device_kind
  for name, peak in DENSE_BF16_PEAK_TFLOPS.items():
    if name in kind:
      return peak
  return None


def vit_b16_config(batch: int, tiny: bool):
  """MoCo-v3 ViT-B/16 (Chen et al. 2021), the ImageNet recipe: 224 px, bf16 compute, 4096-wide
  projector/predictor, 256-d output. Only the batch and the strategies timed are the benchmark's."""
  c = imagenet_mocov3_vit_b16.get_config()
  c.batch_size = batch
  c.compression.cost_candidates = ("keep0.5|keep0.5", "keep0.25|keep0.25", "patch32|patch32",
                                   "keep0.25|full")
  if tiny:  # same structure, CPU-sized
    c.model.image_size, c.model.patch_size = 32, 4
    c.model.width, c.model.depth, c.model.num_heads = 64, 2, 2
    c.model.dtype = "float32"
    c.mocov3.proj_hidden_dim = c.mocov3.pred_hidden_dim = 128
    c.compression.cost_candidates = ("keep0.5|keep0.5", "keep0.25|keep0.25", "patch8|patch8",
                                     "keep0.25|full")
  return c


def vit_s16_config(batch: int, tiny: bool):
  """The same recipe at ViT-S/16 (width 384, 6 heads; DeiT-S / MoCo-v3's ViT-Small)."""
  c = vit_b16_config(batch, tiny)
  if not tiny:
    c.model.width, c.model.num_heads = 384, 6
  return c


def peer_spec(config) -> dict:
  m = config.model
  return dict(image=m.image_size, patch=m.patch_size, width=m.width, depth=m.depth,
              heads=m.num_heads, mlp=m.mlp_ratio, hidden=config.mocov3.proj_hidden_dim,
              out=config.mocov3.out_dim)


# The peer's strategies: token keep on both branches (timm has no flexible patch size).
PEER_STRATEGIES = {"full": 1.0, "keep0.5|keep0.5": 0.5, "keep0.25|keep0.25": 0.25}


def run_peer(config, device: str) -> dict | str:
  """PyTorch + timm's step for `config` in a child process (the GPU is not yet JAX's); its
  {strategy: ms} or the reason it did not run."""
  args = {"spec": peer_spec(config), "batch": config.batch_size, "repeats": FLAGS.repeats,
          "strategies": PEER_STRATEGIES, "device": device,
          "dtype": "bfloat16" if device != "cpu" else "float32",
          "compile_model": device != "cpu"}
  return child.run([FLAGS.peer_python, os.path.join(os.path.dirname(__file__), "timm_peer.py"),
                    json.dumps(args)])


def matmul_tflops(dtype="bfloat16", n: int = 8192, repeats: int = 10) -> float:
  """Measured dense matmul rate (TFLOP/s) of an n x n x n product: the chip's attainable peak."""
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def default_config(batch: int, dtype: str):
  """The embedded default recipe (configs/fmnist_mocov3.py) at the benchmark's batch and dtype."""
  c = fmnist_mocov3.get_config()
  c.batch_size = batch
  c.model.dtype = dtype
  c.compression.cost_candidates = ("patch8|patch8", "keep0.5|keep0.5", "keep0.25|keep0.25")
  return c


def describe(config) -> str:
  m = config.model
  return (f"ViT w{m.width} d{m.depth} h{m.num_heads} patch {m.patch_size} on {m.image_size}px, "
          f"{m.dtype}, MoCo-v3 heads {config.mocov3.proj_hidden_dim}, batch {config.batch_size}")


def markdown(results: dict) -> str:
  peak = results["peak_tflops"]
  lines = ["# GPU benchmark: train step per compression strategy", "",
           f"Machine: {results['machine']}. Command: `{results['command']}`. "
           f"Date: {results['date']}. Measured dense matmul rate (8192^3 bf16; 512^3 float32 "
           f"with --tiny): {results.get('matmul_tflops', 0):.3g} TFLOP/s.", "",
           "FLOPs per step are the analytic cost model's (2 per multiply-add: patch embedding, "
           "attention and MLP of every branch, the heads; backward = 2x forward); MFU = those "
           f"FLOPs / step time / {peak or 'n/a'} TFLOP/s (dense bf16 datasheet peak). XLA's own "
           "count (`compiled.cost_analysis()`) is shown for reference: on GPU it misses most of the "
           "matmuls (library calls) and reads 4-20x low here.", ""]
  for block in results["models"]:
    lines += [f"## {block['name']}: {block['description']}", "",
              "| strategy (query\\|key) | seq | key seq | ms/step | img/s | speed-up | analytic | "
              "TFLOP/step | TFLOP/s | MFU | XLA TFLOP/step | compile s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    measured_peak = results.get("matmul_tflops")
    for r in block["rows"]:
      tflop = r["analytic_flops"] / 1e12
      rate = tflop / (r["ms_per_step"] / 1e3)
      mfu = f"{100 * rate / peak:.1f}%" if peak else "n/a"
      if measured_peak:
        mfu += f" ({100 * rate / measured_peak:.0f}% of measured)"
      xla = f"{r['xla_flops'] / 1e12:.3g}" if r.get("xla_flops") else "n/a"
      peer = block.get("peer", {})
      peer_ms = peer.get(r["strategy"]) if isinstance(peer, dict) else None
      vs_peer = f" (timm {peer_ms:.1f}: {peer_ms / r['ms_per_step']:.2f}x)" if peer_ms else ""
      lines.append(
          f"| {r['query']}\\|{r['key']} | {r['seq_len']} | {r['key_seq_len']} | "
          f"{r['ms_per_step']:.1f}{vs_peer} | {r['images_per_s']:.0f} | "
          f"{r['measured_speedup']:.2f}x | "
          f"{r['analytic_speedup']:.2f}x | {tflop:.3g} | {rate:.3g} | {mfu} | {xla} | "
          f"{r['compile_s']:.0f} |")
    if isinstance(block.get("peer"), str):
      lines.append(f"\nPyTorch + timm peer not measured: {block['peer']}")
    elif block.get("peer"):
      lines.append(f"\nPeer: {block['peer'].get('_versions')}, bf16 autocast, torch.compile, "
                   "same batch, heads and kept-token counts; (timm ms: its ms / ours).")
    if block.get("error"):
      lines.append(f"\nStopped early: {block['error']}")
    lines.append("")
  return "\n".join(lines)


def xla_child(name: str) -> None:
  """In a process started with XLA_FLAGS = XLA_FLAG_SETS[name]: the ViT-B/16 full-length step."""
  config = vit_b16_config(32 if FLAGS.tiny else FLAGS.vit_b_batch, FLAGS.tiny)
  config.compression.cost_candidates = ()
  config.compression.cost_repeats = FLAGS.repeats
  row = cost_table.measure(config)[0]
  child.emit({"ms_per_step": row["ms_per_step"], "compile_s": row["compile_s"],
              "device": jax.devices()[0].device_kind})


def xla_ab() -> None:
  """Every XLA_FLAG_SETS entry (or --xla_sets) in its own process, alternating twice (drift hits
  all); the lower of each entry's two medians, and its speed relative to the default's. This process never starts
  JAX: the children need the accelerator's memory."""
  unknown = set(FLAGS.xla_sets) - set(XLA_FLAG_SETS)
  if unknown:
    raise app.UsageError(f"--xla_sets: unknown {sorted(unknown)}; known {list(XLA_FLAG_SETS)}")
  rows = {k: [] for k in XLA_FLAG_SETS
          if k == "default" or not FLAGS.xla_sets or k in FLAGS.xla_sets}
  inherited = os.environ.get("XLA_FLAGS", "")   # the user's own flags stay under every set
  for _ in range(2):
    for key in rows:
      xla_flags = XLA_FLAG_SETS[key]
      cmd = [sys.executable, os.path.abspath(__file__), f"--xla_child={key}",
             f"--vit_b_batch={FLAGS.vit_b_batch}", f"--repeats={FLAGS.repeats}"]
      got = child.run(cmd + (["--tiny"] if FLAGS.tiny else []), timeout=FLAGS.xla_timeout_s,
                      env=dict(os.environ, XLA_FLAGS=f"{inherited} {xla_flags}".strip()))
      rows[key].append(got)
      print(f"== {key}: {got}", flush=True)
  base = [r["ms_per_step"] for r in rows["default"] if isinstance(r, dict)]
  kinds = [r["device"] for got in rows.values() for r in got if isinstance(r, dict)]
  name = "cpu_tiny" if FLAGS.tiny else (kinds[0] if kinds else "unknown").replace(" ", "_").lower()
  lines = ["# XLA flags: the ViT-B/16 full-length MoCo-v3 step", "",
           f"Device: {kinds[0] if kinds else 'unknown'}. Date: {time.strftime('%Y-%m-%d')}. "
           f"Batch {32 if FLAGS.tiny else FLAGS.vit_b_batch}; each set in its own process, "
           "twice, alternating; ms = the lower of the two processes' medians"
           + (f"; every set on top of the environment's XLA_FLAGS=`{inherited}`" if inherited
              else "") + ".", "",
           "| set | XLA_FLAGS | ms/step | vs default |", "|---|---|---:|---:|"]
  out = []
  for key, got in rows.items():
    ok = [r["ms_per_step"] for r in got if isinstance(r, dict)]
    ms = min(ok) if ok else None
    rel = f"{min(base) / ms:.3f}x" if ms and base else "n/a"
    lines.append(f"| {key} | `{XLA_FLAG_SETS[key] or '(none)'}` | "
                 f"{f'{ms:.1f}' if ms else 'failed: ' + str(got[-1])[:80]} | {rel} |")
    out.append({"set": key, "xla_flags": XLA_FLAG_SETS[key], "ms_per_step": ms, "runs": got})
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  path = os.path.join(FLAGS.out_dir, f"gpu_xla_flags_{name}")
  io.atomic_write_json(path + ".json", out)
  io.atomic_write_text(path + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  if FLAGS.xla_child:
    return xla_child(FLAGS.xla_child)
  if FLAGS.xla_ab:
    return xla_ab()
  if FLAGS.rerender:
    with open(FLAGS.rerender) as f:
      text = markdown(json.load(f))
    io.atomic_write_text(FLAGS.rerender[:-5] + ".md", text)
    print(text)
    return
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  if FLAGS.tiny:
    models = [("vit_b16 (tiny stand-in)", vit_b16_config(32, tiny=True)),
              ("embedded default", default_config(16, "float32"))]
  else:
    models = [("ViT-B/16", vit_b16_config(FLAGS.vit_b_batch, tiny=False)),
              ("ViT-S/16", vit_s16_config(FLAGS.vit_s_batch, tiny=False)),
              ("embedded default, bf16", default_config(FLAGS.default_batch, "bfloat16"))]
  # The peer first, each in its own process, before JAX takes the accelerator's memory.
  peers = {}
  if FLAGS.peer:
    device = "cpu" if FLAGS.tiny else "cuda"
    for model_name, config in models:
      peers[model_name] = run_peer(config, device)
      print(f"== peer {model_name}: {peers[model_name]}", flush=True)
  dev = jax.devices()[0]
  name = "cpu_tiny" if FLAGS.tiny else dev.device_kind.replace(" ", "_").lower()
  json_path = os.path.join(FLAGS.out_dir, f"gpu_{name}.json")
  results = {"machine": cost_table.machine_description(), "peak_tflops": peak_tflops(),
             "matmul_tflops": matmul_tflops(n=512 if FLAGS.tiny else 8192,
                                            dtype="float32" if FLAGS.tiny else "bfloat16"),
             "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
             "date": time.strftime("%Y-%m-%d"), "models": []}

  def save():
    io.atomic_write_json(json_path, results)
    io.atomic_write_text(json_path[:-5] + ".md", markdown(results))

  for model_name, config in models:
    config.compression.cost_repeats = FLAGS.repeats
    block = {"name": model_name, "description": describe(config), "rows": [],
             "peer": peers.get(model_name, "not run (--nopeer)")}
    results["models"].append(block)
    print(f"== {model_name}: {block['description']}", flush=True)

    def on_row(row, block=block, config=config):
      row["images_per_s"] = config.batch_size / (row["ms_per_step"] / 1e3)
      block["rows"].append(row)
      print(f"   {row['strategy']:<22} {row['ms_per_step']:8.1f} ms/step  "
            f"{row['images_per_s']:8.0f} img/s  compile {row['compile_s']:.0f}s", flush=True)
      save()

    try:
      cost_table.measure(config, on_row=on_row)
    except Exception as e:  # noqa: BLE001 - keep what was measured, say what stopped it
      block["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      print(block["error"], flush=True)
    save()
  print(markdown(results), flush=True)


if __name__ == "__main__":
  app.run(main)
