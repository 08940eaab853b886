"""Input-pipeline throughput on CPU: ImageNet-like JPEGs -> the shipped recipes' training views.

  python bench/pipeline.py [--quick] [--threads=N] [--baseline=HEAD|none] [--variants=...]
                           [--out=bench/results/pipeline_cpu]

Generates ImageNet-like JPEGs (500x375 and 375x500, natural-looking content: smooth colour fields,
shapes, texture and noise; quality 90) into a temporary image folder, then builds the real training
stream, `input_pipeline.pipeline.train_dataset`, for each shipped ImageNet recipe at its resolution
(configs/imagenet_{mocov3,simclr,dino}_vit_b16.py, with data.source=image_folder pointing at the
folder) and measures batches after a warm-up. Paths, side by side in one run:

  crops   this tree: JPEGs decode only the window holding the views' crop boxes, views are cropped
          in uint8 (train_dataset's default)
  whole   this tree, decode_crops=False: every image decoded whole by Pillow, cropped in float
  windows this tree, data.augment_on=device: the host part only - each image's crop boxes drawn
          and the one window holding them decoded and padded to data.window_size
          (views.make_windows); the crop-resize, flip and colours then run on the accelerator
          (device_views.views_from_windows), whose time is the step's, not in this figure
  crops[K=V,...]  the crops path with config overrides, one case per --variants entry (default:
          aug.downscale=area; aug.downscale=bilinear), image folder only
  HEAD    the committed input_pipeline/ (git archive of --baseline), as it was before this tree's
          changes (skipped with --baseline=none or outside a git checkout)

and the TFDS source (a tiny TFDS dataset of the same JPEGs, built offline in a temporary data_dir,
read with TFDS's in-memory auto-cache off, as ImageNet is read) for `crops` and `whole`. Each
implementation runs in its own process (one TF runtime each); this tree's and HEAD's alternate
--rounds times, and the paths of one recipe are measured in alternating chunks.

Reported per case: images/s (wall), images/s per core (the tf.data thread pool is pinned to
--threads, default os.cpu_count(); per core = images/s / min(threads, cpus)), images per CPU-second
of the process, and the CPU that other processes used meanwhile (from /proc/stat): when that is
not ~0, the machine was shared and the absolute numbers are low (the ratios between paths, measured
alternately in the same conditions, hold up better). Writes OUT.md and OUT.json.

--quick (16 JPEGs per class, batch 16, 1.5 s per case, one round, TFDS, variants and HEAD for
MoCo-v3 only)
runs in about a minute: a smoke test of the bench, its numbers are not measurements.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import io as std_io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {  # name -> config module
    "mocov3": "configs.imagenet_mocov3_vit_b16",
    "simclr": "configs.imagenet_simclr_vit_b16",
    "dino": "configs.imagenet_dino_vit_b16",
}
TFDS_NAME = "vit_accel_bench_jpegs"


# ----------------------------------------------------------------------------------- the data
def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3] that compresses like a photo (~90 kB at 500x375, quality 90; ImageNet's
  train JPEGs average ~110 kB at ~400x350): low-frequency colour fields, a dozen filled shapes with
  soft edges, texture at two scales and sensor-like noise."""
  from PIL import Image, ImageDraw, ImageFilter
  yy, xx = np.mgrid[:height, :width] / max(height, width)
  field = np.empty((height, width, 3), np.float32)
  for c in range(3):
    field[..., c] = rng.uniform(60, 190)
    for _ in range(3):
      fy, fx, phase = rng.uniform(0.3, 3.0), rng.uniform(0.3, 3.0), rng.uniform(0, 2 * np.pi)
      field[..., c] += rng.uniform(15, 50) * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
  image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(8, 20))):
    x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
    w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    else:
      points = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))]
      draw.polygon(points, fill=colour)
  image = np.asarray(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.5)))),
                     np.float32)
  # Texture at two scales (surfaces at 2 px, foliage / fabric in a band at 1 px), then noise.
  small = rng.normal(0, rng.uniform(10, 30), (height // 2 + 1, width // 2 + 1)).astype(np.float32)
  image += np.asarray(Image.fromarray(small, "F").resize((width, height), Image.BICUBIC))[..., None]
  top = int(rng.integers(0, height // 2))
  band = slice(top, top + int(rng.integers(height // 6, height // 2)))
  image[band] += rng.normal(0, 24, image[band].shape[:2])[..., None]
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_image_folder(root: str, per_class: int, classes: int, seed: int = 0) -> dict:
  """ROOT/train/<class>/*.jpg (per_class each) and ROOT/test/<class>/ (2 each); 3 in 4 are 500x375,
  the rest 375x500. Returns {'files', 'mean_kb'}."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  sizes = []
  for split, count in (("train", per_class), ("test", 2)):
    for c in range(classes):
      folder = os.path.join(root, split, f"class{c:02d}")
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        h, w = (375, 500) if i % 4 else (500, 375)
        buffer = std_io.BytesIO()
        Image.fromarray(synthetic_photo(rng, h, w)).save(buffer, "JPEG", quality=90)
        with open(os.path.join(folder, f"{i:04d}.jpg"), "wb") as f:
          f.write(buffer.getvalue())
        sizes.append(len(buffer.getvalue()))
  return {"files": len(sizes), "mean_kb": float(np.mean(sizes)) / 1024}


def build_tfds(image_root: str, data_dir: str) -> None:
  """A tiny TFDS dataset (`TFDS_NAME`, train / test splits) holding the folder's JPEG bytes as they
  are, built offline (nothing is downloaded)."""
  builder_class(image_root)(data_dir=data_dir).download_and_prepare()


_BUILDER = {}


def builder_class(image_root: str = ""):
  """The TFDS builder class (registered under TFDS_NAME once per process, as tfds.builder needs)."""
  if "cls" in _BUILDER:
    return _BUILDER["cls"]
  import tensorflow_datasets as tfds

  class VitAccelBenchJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      classes = sorted(os.listdir(os.path.join(image_root, "train")))
      return tfds.core.DatasetInfo(  # not dataset_info_from_configs: no package metadata
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(names=classes)}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(os.path.join(image_root, split))
              for split in ("train", "test")}

    def _generate_examples(self, folder):
      for name in sorted(os.listdir(folder)):
        for file in sorted(os.listdir(os.path.join(folder, name))):
          path = os.path.join(folder, name, file)
          yield f"{name}/{file}", {"image": path, "label": name}

  _BUILDER["cls"] = VitAccelBenchJpegs
  return VitAccelBenchJpegs


# ------------------------------------------------------------------------------ measurement
def _cpu_ticks() -> tuple[float, float] | None:
  """(busy, total) CPU seconds of the whole machine since boot (Linux /proc/stat), else None."""
  try:
    with open("/proc/stat") as f:
      values = [float(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  hz = os.sysconf("SC_CLK_TCK")
  idle = values[3] + (values[4] if len(values) > 4 else 0.0)
  return (sum(values) - idle) / hz, sum(values) / hz


class Meter:
  """Accumulates one stream's batches over interleaved chunks: images, wall and process CPU time,
  and the CPU that other processes used meanwhile (/proc/stat).

  Each chunk runs on its own iterator, deleted when the chunk ends: a live tf.data iterator keeps
  filling its prefetch buffer and parallel map in the background, and that work would be charged
  to whichever case is timed next (the process's CPU time is shared by all its threads)."""

  def __init__(self, ds, batch: int, warmup_batches: int):
    self.ds, self.batch, self.warmup_batches = ds, batch, warmup_batches
    it = iter(ds)
    start = time.perf_counter()
    next(it)
    self.first_batch_s = time.perf_counter() - start
    del it
    self.images = 0
    self.wall = self.cpu = self.other = 0.0

  def run(self, seconds: float, min_batches: int = 1) -> None:
    it = iter(self.ds)
    for _ in range(self.warmup_batches):   # untimed: the pipeline reaches its steady state
      next(it)
    ticks0, cpu0, wall0 = _cpu_ticks(), time.process_time(), time.perf_counter()
    n = 0
    while n < min_batches or time.perf_counter() - wall0 < seconds:
      next(it)
      n += 1
    wall, cpu, ticks1 = time.perf_counter() - wall0, time.process_time() - cpu0, _cpu_ticks()
    del it   # its background work stops before the next case is timed
    self.images += n * self.batch
    self.wall += wall
    self.cpu += cpu
    if ticks0 and ticks1:
      self.other += max(0.0, (ticks1[0] - ticks0[0]) - cpu)

  def result(self) -> dict:
    return {"images": self.images, "wall_s": self.wall, "cpu_s": self.cpu,
            "images_per_s": self.images / self.wall,
            "images_per_cpu_s": self.images / self.cpu if self.cpu > 0 else float("nan"),
            "process_cores_busy": self.cpu / self.wall, "other_cores_busy": self.other / self.wall,
            "first_batch_s": self.first_batch_s}


def run_worker(spec: dict) -> None:
  """One implementation (impl_dir first on sys.path): every case of `spec`, one JSON line each."""
  sys.path.insert(0, spec["impl_dir"])
  if ROOT not in sys.path:
    sys.path.append(ROOT)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import inspect

  from input_pipeline.tf_runtime import tf

  from input_pipeline import pipeline

  impl = spec["impl"]
  print("RESULT " + json.dumps({"event": "runtime", "impl": impl, "tf": tf.__version__}), flush=True)
  assert os.path.dirname(os.path.abspath(pipeline.__file__)) == os.path.join(
      os.path.abspath(spec["impl_dir"]), "input_pipeline"), pipeline.__file__
  params = inspect.signature(pipeline.train_dataset).parameters
  can_choose, can_window = "decode_crops" in params, "windows" in params
  threads = spec["threads"]
  loaded = {}

  def config_for(recipe: str, source: str):
    c = importlib.import_module(RECIPES[recipe]).get_config()
    c.batch_size = spec["batch"]
    c.data.prefetch = 2
    c.seed = 0
    if source == "image_folder":
      c.data.source, c.data.dir = "image_folder", spec["image_root"]
    else:
      c.data.source, c.data.dir, c.data.tfds_name = "tfds", spec["tfds_dir"], TFDS_NAME
      c.data.tfds_splits.test = "test"
      c.data.shuffle_buffer = 4 * spec["batch"]
    return c

  if spec.get("build_tfds"):
    try:
      t = time.perf_counter()
      build_tfds(spec["image_root"], spec["tfds_dir"])
      print("RESULT " + json.dumps({"event": "tfds_built", "s": time.perf_counter() - t}), flush=True)
    except Exception as e:  # noqa: BLE001 -- reported, the image-folder cases still run
      print("RESULT " + json.dumps({"event": "tfds_failed", "error": f"{type(e).__name__}: {e}"}),
            flush=True)
  if spec.get("tfds_dir"):
    try:
      builder_class(spec["image_root"])
      # TFDS caches a dataset under 250 MiB in memory after its first pass -- decoded, when it
      # decodes. ImageNet is far above that limit, so auto-caching is turned off here: every
      # epoch reads (and decodes) again, as it would on ImageNet.
      import tensorflow_datasets as tfds
      tfds.ReadConfig = functools.partial(tfds.ReadConfig, try_autocache=False)
    except Exception:  # noqa: BLE001 -- no tensorflow_datasets: the TFDS cases fail below
      pass

  # Cases of one (recipe, source) are measured in alternating chunks, so that a change in the
  # machine's load during the group hits every path alike.
  groups = {}
  for case in spec["cases"]:
    groups.setdefault((case["recipe"], case["source"]), []).append(case)
  for (recipe, source), cases in groups.items():
    rows, meters = [], []
    for case in cases:
      row = dict(case, impl=impl, threads=threads)
      rows.append(row)
      try:
        config = config_for(recipe, source)
        if source not in loaded:
          t = time.perf_counter()
          loaded[source] = pipeline.load_source(config, "train")
          row["load_source_s"] = time.perf_counter() - t
        if not can_choose and case["path"] != "whole":
          raise ValueError(f"{impl} has no crop-decoding path")
        if case["path"] == "windows" and not can_window:
          raise ValueError(f"{impl} has no device-views path")
        for key, value in case.get("overrides", {}).items():
          section, name = key.split(".")
          config[section][name] = value
        kwargs = {"decode_crops": case["path"] != "whole"} if can_choose else {}
        if case["path"] == "windows":
          kwargs["windows"] = int(config.data.window_size)
        ds = pipeline.train_dataset(loaded[source], config,
                                    pipeline.HostShard(0, 1, spec["batch"]), **kwargs)
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        meters.append((row, Meter(ds.with_options(options), spec["batch"],
                                  spec["warmup_batches"])))
        row["resolution"] = int(config.model.image_size)
        row["local_crops"] = int(config.aug.local_crops)
      except Exception as e:  # noqa: BLE001 -- one failed case is reported, the others still run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    chunks = spec["chunks"]
    for _ in range(chunks):
      for row, meter in meters:
        meter.run(spec["seconds"] / chunks, max(1, spec["min_batches"] // chunks))
    for row, meter in meters:
      row.update(meter.result())
    for row in rows:
      print("RESULT " + json.dumps(row), flush=True)
    del meters   # the groups' iterators (and their threads) go before the next group starts


# ------------------------------------------------------------------------------------ driver
# Keys a case may override: how views are made, not what is loaded (the source is loaded once per
# process and shared by the cases; the batch is the bench's --batch).
VARIANT_KEYS = ("aug.", "data.prefetch")


def parse_variant(text: str) -> dict:
  """'aug.downscale=area,data.prefetch=8' -> {key: value}: `aug.*` or data.prefetch keys
  (VARIANT_KEYS) with a value inside the key's domain
  (vit_accel/config_domains.py); tuple values as 'aug.crop_scale=(0.2,1.0)'.
  Raises ValueError otherwise."""
  import ast
  import re

  from vit_accel.config_domains import DOMAINS
  out = {}
  for item in re.split(r",(?=[\w.]+=)", text):
    key, eq, raw = item.strip().partition("=")
    allowed = any(key == k or (k.endswith(".") and key.startswith(k)) for k in VARIANT_KEYS)
    if not eq or key not in DOMAINS or not allowed:
      raise ValueError(f"{item!r} is not key=value with a config key of {VARIANT_KEYS}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if not DOMAINS[key].ok(value):
      raise ValueError(f"{key}={raw}: expected {DOMAINS[key].describe()}")
    out[key] = value
  return out


def head_tree(ref: str, into: str) -> str | None:
  """input_pipeline/ of git `ref` extracted under `into` (None, with a note, when impossible)."""
  try:
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "input_pipeline"],
                             capture_output=True, check=True, timeout=60).stdout
    os.makedirs(into, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True, timeout=60)
    return into
  except (OSError, subprocess.SubprocessError) as e:
    print(f"note: no {ref} baseline ({type(e).__name__}: {e})", file=sys.stderr)
    return None


def spawn(spec: dict) -> list:
  """Run one worker process (run_worker) on `spec`; its result rows (plus a 'worker_failed' event
  naming the last stderr line if it died)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                        capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu"))
  rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
          if line.startswith("RESULT ")]
  if proc.returncode:
    rows.append({"event": "worker_failed", "impl": spec["impl"],
                 "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                 f"exit {proc.returncode}"})
  return rows


def combine(raw: list) -> list:
  """One row per (impl, recipe, source, path): the rounds' images and times summed, rates
  recomputed; events (notes) kept once."""
  rows, by_key = [], {}
  for r in raw:
    if "recipe" not in r:
      if r.get("event") != "runtime" or not any(x.get("event") == "runtime" for x in rows):
        rows.append({k: v for k, v in r.items() if k != "round"})
      continue
    key = (r["impl"], r["recipe"], r["source"], r["path"])
    if key not in by_key:
      by_key[key] = {k: v for k, v in r.items() if k != "round"}
      rows.append(by_key[key])
      continue
    row = by_key[key]
    if "error" in r or "error" in row:
      row.setdefault("error", r.get("error"))
      continue
    other = row["other_cores_busy"] * row["wall_s"] + r["other_cores_busy"] * r["wall_s"]
    for k in ("images", "wall_s", "cpu_s"):
      row[k] += r[k]
    row["first_batch_s"] = max(row["first_batch_s"], r["first_batch_s"])
    row.update(images_per_s=row["images"] / row["wall_s"],
               images_per_cpu_s=row["images"] / row["cpu_s"],
               process_cores_busy=row["cpu_s"] / row["wall_s"], other_cores_busy=other / row["wall_s"])
  return rows


def fmt(value, digits=0):
  """A number for the table ('-' for None)."""
  return "-" if value is None else f"{value:.{digits}f}"


def report(rows: list, meta: dict) -> str:
  """The markdown report: set-up, contamination warning, one table row per case, notes."""
  cases = [r for r in rows if "recipe" in r]
  by_key = {(r["recipe"], r["source"], r["impl"], r["path"]): r for r in cases}
  lines = [
      "# Input pipeline throughput on CPU (ImageNet-like JPEGs -> training views)", "",
      f"Measured {meta['date']} on {meta['machine']}; TensorFlow {meta['tf']}. Command: "
      f"`python bench/pipeline.py {meta['args']}`.", "",
      f"Data: {meta['data']['files']} generated JPEGs (500x375 and 375x500, quality 90, "
      f"{meta['data']['mean_kb']:.0f} kB on average), {meta['classes']} class folders. "
      f"Batch {meta['batch']}; tf.data thread pool {meta['threads']} threads "
      f"(per core = images/s / {meta['cores']}); {meta['warmup_batches']} untimed warm-up batches per chunk, each chunk on a fresh iterator (no background work carried into another case), then "
      f">= {meta['seconds']} s per case and round, the paths of a recipe in {meta['chunks']} "
      f"alternating chunks; {meta['rounds']} round(s), this tree's and HEAD's processes "
      f"alternating.", "",
      "Paths: `crops` = JPEGs decode only the window holding the views' crops (default); `whole` = "
      "`decode_crops=False`, every image decoded whole (Pillow for image folders) and cropped in "
      "float; `windows` = `data.augment_on=device`: the host's part only (boxes drawn, the "
      "window holding them decoded and padded to `data.window_size`), the views' crop-resize, "
      "flip and colours are then the accelerator's; `crops[K=V]` = the crops path with those "
      "config overrides (defaults: `aug.downscale=antialias`); "
      "`HEAD whole` / `HEAD crops` = those paths of the committed input_pipeline/ (--baseline); "
      "`vs HEAD` compares a path with HEAD's same path (variants with HEAD's crops). TFDS rows read a TFDS dataset of the same files, auto-cache off (every "
      "epoch decodes again, as on ImageNet). `other cores` = CPU used by other processes during the case: when it is "
      "not ~0 the machine was shared and absolute rates are depressed.", ""]
  if meta.get("contaminated"):
    lines += [f"**Contaminated run**: {meta['contaminated']}", ""]
  lines += ["Target: >= 250 images/s per core for MoCo-v3's two 224 px views (the pre-change path "
            "was measured at ~137 on this kind of CPU). `images per CPU-s` is the rate per core "
            "actually used, the figure to hold against it when the process did not get all "
            "cores.", ""]
  lines += ["| recipe | px | source | path | images/s | images/s per core | images per CPU-s | "
            "vs whole | vs HEAD | other cores | first batch s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in cases:
    if "error" in r:
      label = f"HEAD {r['path']}" if r["impl"] == "HEAD" else r["path"]
      lines.append(f"| {r['recipe']} | - | {r['source']} | {label} "
                   f"| error: {r['error']} | | | | | | |")
      continue
    whole = by_key.get((r["recipe"], r["source"], "current", "whole"))
    # HEAD's same path: `whole` against whole, `crops` and its variants against HEAD's crops.
    head = by_key.get((r["recipe"], r["source"], "HEAD",
                       "whole" if r["path"] == "whole" else "crops"))
    ratio = lambda other: (f"{r['images_per_s'] / other['images_per_s']:.2f}x"
                           if other and "error" not in other and other is not r else "-")
    path = f"HEAD {r['path']}" if r["impl"] == "HEAD" else r["path"]
    res = f"{r['resolution']}" + (f" + {r['local_crops']}x96" if r.get("local_crops") else "")
    lines.append(
        f"| {r['recipe']} | {res} | {r['source']} | {path} | {r['images_per_s']:.0f} | "
        f"{r['images_per_s'] / meta['cores']:.0f} | {r['images_per_cpu_s']:.0f} | {ratio(whole)} | "
        f"{ratio(head)} | {fmt(r.get('other_cores_busy'), 2)} | {r['first_batch_s']:.1f} |")
  notes = [r for r in rows if "event" in r and r["event"] != "runtime"]
  if notes or meta.get("tfds_note"):
    lines += ["", "Notes:"]
    if meta.get("tfds_note"):
      lines.append(f"- TFDS: {meta['tfds_note']}")
    for r in notes:
      lines.append(f"- {r['event']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "event"))
  loads = [r for r in cases if "load_source_s" in r]
  if loads:
    lines += ["", "Source loading (image folder: index + verification pass, every file decoded "
              "once): " + "; ".join(f"{r['impl']} {r['source']} {r['load_source_s']:.1f} s"
                                     for r in loads) + "."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  """Generate the data, run the workers (this tree, then HEAD, --rounds times), write OUT.md/json."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a smoke run, under ~1 minute")
  parser.add_argument("--recipes", default="mocov3,simclr,dino")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--batch", type=int, default=0, help="default 64 (--quick: 16)")
  parser.add_argument("--per-class", type=int, default=0, help="train JPEGs per class (128; quick 16)")
  parser.add_argument("--classes", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=0,
                      help="per case and round, in alternating chunks (20; quick 1.5)")
  parser.add_argument("--rounds", type=int, default=0,
                      help="this tree's and HEAD's processes alternate this many times (2; quick 1)")
  parser.add_argument("--baseline", default="HEAD", help="git ref of the 'HEAD' column, or none")
  parser.add_argument("--no-tfds", action="store_true")
  parser.add_argument("--variants",
                      default="aug.downscale=area;aug.downscale=bilinear",
                      help="';'-separated cases of the crops path, each 'key=value[,key=value]' "
                           "config overrides ('' for none)")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pipeline_cpu"))
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return run_worker(json.loads(args.worker))

  quick = args.quick
  batch = args.batch or (16 if quick else 64)
  per_class = args.per_class or (16 if quick else 128)
  seconds = args.seconds or (1.5 if quick else 20.0)
  rounds = args.rounds or (1 if quick else 2)
  recipes = [r for r in args.recipes.split(",") if r]
  unknown = set(recipes) - set(RECIPES)
  if unknown:
    parser.error(f"unknown recipe(s) {sorted(unknown)}; available: {', '.join(RECIPES)}")
  if ROOT not in sys.path:
    sys.path.append(ROOT)
  try:
    variants = [parse_variant(v) for v in args.variants.split(";") if v.strip()]
  except ValueError as e:
    parser.error(f"--variants: {e}")
  cores = min(args.threads, os.cpu_count() or 1)
  tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
  try:
    image_root = os.path.join(tmp, "images")
    t = time.perf_counter()
    data = write_image_folder(image_root, per_class, args.classes)
    print(f"generated {data['files']} JPEGs ({data['mean_kb']:.0f} kB mean) in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    tfds_dir = "" if args.no_tfds else os.path.join(tmp, "tfds")
    common = dict(image_root=image_root, tfds_dir=tfds_dir, threads=args.threads, batch=batch,
                  warmup_batches=1 if quick else 2, seconds=seconds,
                  min_batches=2 if quick else 10, chunks=2 if quick else 5)
    current = [{"recipe": r, "source": "image_folder", "path": p}
               for r in recipes for p in ("whole", "crops", "windows")]
    current += [{"recipe": r, "source": "image_folder", "overrides": v,
                 "path": "crops[" + ",".join(f"{k}={x}" for k, x in v.items()) + "]"}
                for r in (recipes[:1] if quick else recipes) for v in variants]
    tfds_recipes = recipes[:1] if quick else recipes
    if tfds_dir:
      current += [{"recipe": r, "source": "tfds", "path": p}
                  for r in tfds_recipes for p in ("whole", "crops", "windows")]
    head_dir = None if args.baseline == "none" else head_tree(args.baseline,
                                                              os.path.join(tmp, "head"))
    head_recipes = recipes[:1] if quick else recipes
    raw = []
    for round_index in range(rounds):
      raw += [dict(r, round=round_index) for r in spawn(dict(
          common, impl="current", impl_dir=ROOT, cases=current,
          build_tfds=bool(tfds_dir) and round_index == 0))]
      if head_dir:
        raw += [dict(r, round=round_index) for r in spawn(dict(
            common, impl="HEAD", impl_dir=head_dir, build_tfds=False, cases=[
                {"recipe": r, "source": "image_folder", "path": p}
                for r in head_recipes for p in ("whole", "crops")]))]
    rows = combine(raw)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  tfds_note = ("not measured (--no-tfds)" if args.no_tfds else
               next((f"could not build a TFDS dataset offline: {r['error']}" for r in rows
                     if r.get("event") == "tfds_failed"), ""))
  others = [r["other_cores_busy"] for r in rows if r.get("other_cores_busy") is not None]
  busy = max(others, default=0.0)
  contaminated = []
  if quick:
    contaminated.append("--quick (short cases, small batches: a smoke test, not a measurement)")
  if busy > 0.25:
    contaminated.append(f"other processes kept up to {busy:.1f} of {os.cpu_count()} cores busy")
  tf_version = next((r["tf"] for r in rows if r.get("event") == "runtime"), "?")
  meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
          "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
                     f"Python {platform.python_version()})",
          "tf": tf_version, "data": data, "classes": args.classes, "batch": batch,
          "threads": args.threads, "cores": cores, "seconds": seconds,
          "warmup_batches": common["warmup_batches"], "min_batches": common["min_batches"],
          "rounds": rounds, "chunks": common["chunks"],
          "tfds_note": tfds_note, "contaminated": "; ".join(contaminated),
          "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
  text = report(rows, meta)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
      f.write(text)
    with open(args.out + ".json", "w") as f:
      json.dump({"meta": meta, "rows": rows, "per_round": raw}, f, indent=1, default=str)
      f.write("\n")


if __name__ == "__main__":
  main()
