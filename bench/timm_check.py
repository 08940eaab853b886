"""Checks an export (--mode=export) in real timm: the exported backbone loaded into timm computes the
same CLS features as our Flax model.

  python bench/timm_check.py workdirs/fmnist_mocov3/export/step_1070 [--images=8] [--atol=1e-4]

Needs torch, timm and safetensors (not requirements of vit-accel; e.g. `pip install torch timm`
in another environment that also has this repository's requirements). Loads model.safetensors two
ways, `timm.models.vision_transformer.VisionTransformer(**architecture)` +
`load_state_dict(strict=True)`, and `timm.create_model("vit_base_patch16_224", pretrained=True,
pretrained_cfg_overlay=...)` with config.json's architecture and preprocessing; our side is
flax_params.msgpack through vit_accel.export.load_flax_backbone. Both get the same random uint8
images normalised with config.json's mean / std (NCHW for timm, NHWC for Flax), float32. Prints
the max abs difference of the CLS features per route; exit code 0 when each is <= --atol, 1 when
not, 2 when torch / timm / safetensors are missing or the directory is not an export.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("export_dir", help="an export directory: WORKDIR/export/step_<N>")
  parser.add_argument("--images", type=int, default=8, help="random images compared")
  parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted abs difference")
  args = parser.parse_args()
  try:
    import safetensors.torch
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer
  except ImportError as e:
    print(f"timm_check: needs torch, timm and safetensors ({e}); install them, e.g. "
          f"`pip install torch timm safetensors`, in an environment with vit-accel's requirements",
          file=sys.stderr)
    return 2
  from vit_accel import export

  directory = os.path.abspath(args.export_dir)
  try:
    with open(os.path.join(directory, export.CONFIG_FILE)) as f:
      cfg = json.load(f)
    arch, pre = cfg["architecture"], cfg["pretrained_cfg"]
  except (OSError, KeyError, ValueError) as e:
    print(f"timm_check: {directory} is not an export of --mode=export ({e})", file=sys.stderr)
    return 2
  weights = os.path.join(directory, export.SAFETENSORS_FILE)

  size = arch["img_size"]
  images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, arch["in_chans"]),
                                             dtype=np.uint8)
  x = ((images.astype(np.float32) / 255.0 - np.asarray(pre["mean"], np.float32))
       / np.asarray(pre["std"], np.float32))

  model, params = export.load_flax_backbone(directory)
  ours = np.asarray(model.apply({"params": params}, x)[0], np.float32)

  torch_x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  direct = VisionTransformer(**arch)
  direct.load_state_dict(safetensors.torch.load_file(weights), strict=True)
  routes = {"VisionTransformer(**architecture) + load_state_dict(strict=True)": direct}
  try:
    routes["timm.create_model(pretrained_cfg_overlay=...)"] = timm.create_model(
        "vit_base_patch16_224", pretrained=True,
        pretrained_cfg_overlay=dict(pre, file=weights), **arch)
  except Exception as e:  # noqa: BLE001 - report which route failed; the check then fails
    print(f"timm.create_model route: FAILED in timm {timm.__version__} ({e})")
    routes["timm.create_model(pretrained_cfg_overlay=...)"] = None

  worst = 0.0
  for name, net in routes.items():
    if net is None:
      worst = float("inf")
      continue
    with torch.no_grad():
      feats = net.eval()(torch_x).numpy()
    diff = float(np.abs(feats - ours).max())
    worst = max(worst, diff)
    print(f"{name}: CLS features {feats.shape}, max abs difference to Flax {diff:.3g}")
  ok = worst <= args.atol
  print(f"timm {timm.__version__}, torch {torch.__version__}: "
        f"{'OK' if ok else 'MISMATCH'} (max {worst:.3g}, tolerance {args.atol:g})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
