"""The peer of our train step in PyTorch + timm: symmetric MoCo-v3 on timm's VisionTransformer.

Used by bench/cpu_peer.py (CPU, float32, eager) and bench/gpu.py (GPU, bf16 autocast,
torch.compile). The model mirrors ours: timm VisionTransformer with a CLS token without a position
embedding (`no_embed_class`), qkv bias, exact GELU, LayerNorm eps 1e-6, scaled-dot-product
attention; MoCo-v3's projector (3 layers) and predictor (2 layers) with BatchNorm, a momentum copy
of backbone and projector, InfoNCE at temperature 0.2 on both view pairs (Chen et al. 2021), AdamW.
Token keep: the kept patch tokens are gathered after the position embedding, as ours does. torch
and timm are not requirements of vit-accel; importing this module needs them.
"""
from __future__ import annotations

import copy
import os
import statistics
import time


def measure(spec: dict, batch: int, repeats: int, strategies: dict, *, device: str = "cpu",
            dtype: str = "float32", compile_model: bool = False) -> dict:
  """Median ms per train step for each strategy.

  spec: {image, patch, width, depth, heads, mlp, hidden, out} (pixels, patch pixels, widths).
  strategies: {name: kept fraction of patch tokens on both branches} (1.0 = full length).
  dtype: 'float32' or 'bfloat16' (autocast; parameters and optimiser state stay float32).
  Returns {name: ms} plus '_versions'. Raises ImportError where torch or timm is missing.
  """
  import timm
  import torch
  import torch.nn.functional as F
  from torch import nn

  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)

  def mlp(d_in, hidden, out, layers, last_bn):
    mods, d = [], d_in
    for _ in range(layers - 1):
      mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
      d = hidden
    mods.append(nn.Linear(d, out, bias=not last_bn))
    if last_bn:
      mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)

  vit = timm.models.vision_transformer.VisionTransformer(
      img_size=spec["image"], patch_size=spec["patch"], num_classes=0, embed_dim=spec["width"],
      depth=spec["depth"], num_heads=spec["heads"], mlp_ratio=spec["mlp"], qkv_bias=True,
      class_token=True, no_embed_class=True, global_pool="token")
  online = nn.ModuleDict({"vit": vit, "proj": mlp(spec["width"], spec["hidden"], spec["out"], 3,
                                                  True)}).to(device)
  predictor = mlp(spec["out"], spec["hidden"], spec["out"], 2, False).to(device)
  momentum = copy.deepcopy(online).requires_grad_(False)
  params = list(online.parameters()) + list(predictor.parameters())
  opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  n = (spec["image"] // spec["patch"]) ** 2
  autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16")

  def features(net, x, kept):
    m = net["vit"]
    x = m.patch_embed(x) + m.pos_embed
    if kept < n:
      idx = torch.rand(x.shape[0], n, device=x.device).argsort(dim=1)[:, :kept]
      x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return m.norm(m.blocks(x))[:, 0]

  def infonce(q, k, t=0.2):
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    return 2 * t * F.cross_entropy(q @ k.T / t, torch.arange(q.shape[0], device=q.device))

  def forward(x1, x2, kept):
    with autocast:
      q1 = predictor(online["proj"](features(online, x1, kept)))
      q2 = predictor(online["proj"](features(online, x2, kept)))
      with torch.no_grad():
        k1 = momentum["proj"](features(momentum, x1, kept))
        k2 = momentum["proj"](features(momentum, x2, kept))
    return infonce(q1, k2) + infonce(q2, k1)

  def step(x1, x2, kept, fwd):
    loss = fwd(x1, x2, kept)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_mul_(list(momentum.parameters()), 0.99)
      torch._foreach_add_(list(momentum.parameters()), list(online.parameters()), alpha=0.01)
    return loss

  x1 = torch.randn(batch, 3, spec["image"], spec["image"], device=device)
  x2 = torch.randn(batch, 3, spec["image"], spec["image"], device=device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  out = {}
  for name, keep in strategies.items():
    kept = max(1, round(n * keep))
    fwd = torch.compile(forward) if compile_model else forward
    for _ in range(3):
      step(x1, x2, kept, fwd)
    sync()
    times = []
    for _ in range(max(5, repeats)):
      t0 = time.perf_counter()
      step(x1, x2, kept, fwd)
      sync()
      times.append(time.perf_counter() - t0)
    out[name] = 1000.0 * statistics.median(times)
  out["_versions"] = f"torch {torch.__version__}, timm {timm.__version__}"
  return out


if __name__ == "__main__":
  # python bench/timm_peer.py '{"spec": {...}, "batch": 256, "repeats": 10, "strategies": {...},
  #                              "device": "cuda", "dtype": "bfloat16", "compile_model": true}'
  import json
  import sys
  args = json.loads(sys.argv[1])
  result = measure(args["spec"], args["batch"], args["repeats"], args["strategies"],
                   device=args.get("device", "cpu"), dtype=args.get("dtype", "float32"),
                   compile_model=args.get("compile_model", False))
  import child  # noqa: I001  (bench/child.py: this script's directory is on sys.path)
  child.emit(result)
