"""The pretrained backbone in formats other code reads: timm / PyTorch and Flax.

One export is a directory of three files:

  model.safetensors     the backbone as timm's `VisionTransformer` state dict (float32, PyTorch
                        layouts, timm's parameter names), no classifier head
  config.json           `architecture`: timm `VisionTransformer` constructor arguments;
                        `pretrained_cfg`: timm-style preprocessing (mean, std, input size,
                        interpolation); `flax`: our `VisionTransformer` fields; `source`: which
                        run, checkpoint and weights it came from
  flax_params.msgpack   the same parameters in our Flax layout (flax.serialization msgpack), read
                        back by `load_flax_backbone`

Our ViT and timm's compute the same function on the same normalised image (up to float rounding):
pre-norm blocks, LayerNorm eps 1e-6 (flax's default, timm's ViT's), exact (erf) GELU, qkv with
bias, no layer scale, no pre-norm before the blocks, the final norm before pooling and the CLS token
as the feature (timm's `global_pool="token"`, `fc_norm` off). The one difference in parameters: our
CLS token gets no position embedding, timm's default ViT (`no_embed_class=False`) adds
`pos_embed[:, 0]` to it, so that slot is written as zeros and adding it changes nothing.

Patch size: an export is made at the base patch size (the learned kernel's). `export.patch_size=P`
exports the model at patch P instead: the kernel PI-resized to P x P and the position embedding
resized to the (S/P)^2 grid with the functions the model itself uses for a `patchP` compression
strategy (compression.pi_resize_kernel, compression.resize_pos_embed), so the export computes what
our model computes under strategy `patchP`. P must divide the image size. (Overriding
`model.patch_size` instead would describe another model, whose checkpoint shapes do not match.)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from safetensors.numpy import save_file

from vit_accel import compression
from vit_accel.errors import UserError
from vit_accel.models.vit import VisionTransformer

SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FLAX_FILE = "flax_params.msgpack"
FORMAT = 1   # bumped when the files' layout changes


def check_patch_size(patch_size: int, image_size: int) -> None:
  """Raises UserError (one line) unless `patch_size` (export.patch_size; 0 = the base patch) tiles
  the `image_size` px image."""
  if patch_size and (patch_size > image_size or image_size % patch_size):
    raise UserError(f"export.patch_size={patch_size} does not tile model.image_size={image_size}; "
                    f"pick a divisor of {image_size}, or 0 for the base patch")


def resize_to_patch(params: dict, patch_size: int, image_size: int) -> dict:
  """Backbone params (our Flax tree) -> the same tree at patch size `patch_size`: kernel
  [b, b, C, D] -> [p, p, C, D] by FlexiViT's pseudo-inverse resize and pos_embed [1, (S/b)^2, D] ->
  [1, (S/p)^2, D], by the functions the model applies for a `patchP` strategy (Beyer et al. 2023,
  "FlexiViT"; vit_accel/compression.py). float32 NumPy arrays; the input is not modified. Returns
  `params` itself when `patch_size` is the base. Raises ValueError when p does not tile S."""
  base = params["patch_embed"]["kernel"].shape[0]
  if patch_size == base:
    return params
  if image_size % patch_size:
    raise ValueError(f"patch {patch_size} does not tile the {image_size}px image")
  out = dict(params)
  kernel = compression.pi_resize_kernel(jnp.asarray(params["patch_embed"]["kernel"]), patch_size)
  out["patch_embed"] = {**params["patch_embed"], "kernel": np.asarray(kernel, np.float32)}
  pos = compression.resize_pos_embed(jnp.asarray(params["pos_embed"]), image_size // patch_size)
  out["pos_embed"] = np.asarray(pos, np.float32)
  return out


def timm_architecture(*, width: int, depth: int, num_heads: int, mlp_ratio: float,
                      patch_size: int, image_size: int, in_chans: int = 3) -> dict:
  """timm `VisionTransformer(**arch)` keyword arguments for our backbone (timm >= 0.9,
  timm/models/vision_transformer.py): the sizes plus every switch whose value our model fixes, set
  explicitly rather than left to timm's defaults. num_classes=0: no head, the model returns the
  final-LayerNorm'd CLS feature [B, width]."""
  return {
      "img_size": image_size, "patch_size": patch_size, "in_chans": in_chans,
      "embed_dim": width, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
      "num_classes": 0, "global_pool": "token", "class_token": True,
      "no_embed_class": False,    # pos_embed has a (zero) CLS slot, timm's default layout
      "qkv_bias": True, "qk_norm": False, "init_values": None,   # init_values: no layer scale
      "pre_norm": False, "fc_norm": False,
  }


def timm_state_dict(params: dict, num_heads: int) -> dict[str, np.ndarray]:
  """Our backbone params -> timm `VisionTransformer` state dict, float32 contiguous NumPy arrays.

  Args:
    params: the backbone's Flax params (nested dict; jax or NumPy arrays): patch_embed {kernel
      [p, p, C, D], bias [D]}, cls_token [1, 1, D], pos_embed [1, N, D] (no CLS slot), block<i>
      {ln1, attn {query, key, value: kernel [D, H, hd], bias [H, hd]; out: kernel [H, hd, D], bias
      [D]}, ln2, mlp {fc1, fc2}}, norm.
    num_heads: H, checked against the attention kernels.

  Returns {name: array}: cls_token [1, 1, D]; pos_embed [1, 1 + N, D] (slot 0, CLS, zeros: ours
  has none); patch_embed.proj.weight [D, C, p, p] (a Conv2d kernel: our patches flatten as
  (row, col, channel), so the kernel is transposed, not reshaped) and .bias; per block i:
  norm1/norm2 .weight/.bias; attn.qkv.weight [3D, D] and .bias [3D]: rows q, k, v, each head-major
  (head h, dim j at row h*hd + j), the order timm's `reshape(B, N, 3, H, hd)` reads;
  attn.proj.weight [D, D] (input column h*hd + j) and .bias; mlp.fc1 / mlp.fc2 .weight [out, in]
  (PyTorch Linear: the transpose of a Flax Dense kernel) and .bias; norm.weight/.bias.
  Raises ValueError when a shape disagrees with `num_heads`.
  """
  p = _numpy_tree(params)
  width = p["cls_token"].shape[-1]
  if width % num_heads:
    raise ValueError(f"width {width} is not a multiple of num_heads={num_heads}")
  out = {
      "cls_token": p["cls_token"].reshape(1, 1, width),
      "pos_embed": np.concatenate([np.zeros((1, 1, width), np.float32), p["pos_embed"]], axis=1),
      "patch_embed.proj.weight": p["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": p["patch_embed"]["bias"],
  }
  depth = sum(1 for k in p if k.startswith("block"))
  for i in range(depth):
    b, t = p[f"block{i}"], f"blocks.{i}."
    attn = b["attn"]
    if attn["query"]["kernel"].shape[1] != num_heads:
      raise ValueError(f"block {i} has {attn['query']['kernel'].shape[1]} heads, not "
                       f"num_heads={num_heads}")
    out[t + "norm1.weight"], out[t + "norm1.bias"] = b["ln1"]["scale"], b["ln1"]["bias"]
    # [D, H, hd] -> [D, H*hd] (head-major columns) -> rows of the fused Linear weight.
    out[t + "attn.qkv.weight"] = np.concatenate(
        [attn[n]["kernel"].reshape(width, -1).T for n in ("query", "key", "value")], axis=0)
    out[t + "attn.qkv.bias"] = np.concatenate(
        [attn[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
    out[t + "attn.proj.weight"] = attn["out"]["kernel"].reshape(-1, width).T
    out[t + "attn.proj.bias"] = attn["out"]["bias"]
    out[t + "norm2.weight"], out[t + "norm2.bias"] = b["ln2"]["scale"], b["ln2"]["bias"]
    for fc in ("fc1", "fc2"):
      out[t + f"mlp.{fc}.weight"] = b["mlp"][fc]["kernel"].T
      out[t + f"mlp.{fc}.bias"] = b["mlp"][fc]["bias"]
  out["norm.weight"], out["norm.bias"] = p["norm"]["scale"], p["norm"]["bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def export_config(*, model_cfg, data_cfg, patch_size: int, source: dict) -> dict:
  """config.json's content for a backbone of `model_cfg` (config.model) exported at `patch_size`:
  {format, architecture (timm_architecture), pretrained_cfg, flax, source}.

  pretrained_cfg is timm's preprocessing record, usable as `pretrained_cfg_overlay` together with
  `file=<path to model.safetensors>`: input_size [3, S, S], mean / std = data.mean / data.std
  (images in [0, 1], then (x - mean) / std, as train_step.normalize_images), interpolation
  'bilinear' and crop_pct 1.0 (evaluation resizes the shorter side to S and centre-crops:
  input_pipeline/pipeline.py eval_view), num_classes 0."""
  arch = timm_architecture(width=model_cfg.width, depth=model_cfg.depth,
                           num_heads=model_cfg.num_heads, mlp_ratio=float(model_cfg.mlp_ratio),
                           patch_size=patch_size, image_size=model_cfg.image_size)
  size = model_cfg.image_size
  return {
      "format": FORMAT,
      "architecture": arch,
      "pretrained_cfg": {
          "num_classes": 0, "input_size": [3, size, size], "fixed_input_size": True,
          "mean": [float(m) for m in data_cfg.mean], "std": [float(s) for s in data_cfg.std],
          "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
      },
      "flax": {"width": model_cfg.width, "depth": model_cfg.depth,
               "num_heads": model_cfg.num_heads, "mlp_ratio": float(model_cfg.mlp_ratio),
               "patch_size": patch_size, "image_size": size},
      "source": dict(source, base_patch_size=model_cfg.patch_size,
                     cls_pos_embed="zeros: our ViT adds no position embedding to the CLS token"),
  }


def write_export(directory: str, params: dict, config_json: dict) -> list[str]:
  """Writes model.safetensors (timm_state_dict), config.json (`config_json`) and
  flax_params.msgpack (`params` as float32 NumPy, flax.serialization.msgpack_serialize) into
  `directory`, all or nothing: into a temporary sibling first, renamed into place; an existing
  `directory` (an earlier export of the same checkpoint) is replaced only once the new one is
  complete. Returns the three paths. Raises OSError when a write fails (nothing partial is left)."""
  params = _numpy_tree(params)
  tensors = timm_state_dict(params, config_json["architecture"]["num_heads"])
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
  old = None
  try:
    os.chmod(tmp, 0o755)   # as makedirs would (mkdtemp's 0700 would hide it from others)
    save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE),
              metadata={"format": "pt", "vit_accel_export": str(FORMAT)})
    with open(os.path.join(tmp, FLAX_FILE), "wb") as f:
      f.write(serialization.msgpack_serialize(params))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(json.dumps(config_json, indent=1) + "\n")
    for name in (SAFETENSORS_FILE, FLAX_FILE, CONFIG_FILE):
      fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    if os.path.lexists(directory):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old.", dir=parent)
      os.rename(directory, os.path.join(old, "x"))
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.lexists(directory):   # put the earlier export back
      os.rename(os.path.join(old, "x"), directory)
      shutil.rmtree(old, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return [os.path.join(directory, n) for n in (SAFETENSORS_FILE, CONFIG_FILE, FLAX_FILE)]


def load_flax_backbone(directory: str, dtype=jnp.float32):
  """(model, params) of an export: our Flax `VisionTransformer` built from config.json's `flax`
  fields and its parameters from flax_params.msgpack (float32 NumPy arrays).

    model, params = load_flax_backbone("workdirs/run/export/step_1070")
    cls, tokens = model.apply({"params": params}, images)   # [B, D], [B, N, D]

  `images`: float32 [B, S, S, 3], S = config.json's flax.image_size, values (x / 255 - mean) / std
  with pretrained_cfg's mean and std. `dtype`: the compute dtype (default float32; bfloat16 on
  GPU/TPU). Raises FileNotFoundError when a file is missing, ValueError when the parameters do not
  match the architecture config.json records.
  """
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    cfg = json.load(f)
  model = VisionTransformer(**cfg["flax"], dtype=dtype)
  with open(os.path.join(directory, FLAX_FILE), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  size = cfg["flax"]["image_size"]
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, size, size, 3), jnp.float32))["params"]
  want = {jax.tree_util.keystr(k): v.shape for k, v in
          jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[0][0]
    raise ValueError(f"{os.path.join(directory, FLAX_FILE)} does not match the architecture in "
                     f"{CONFIG_FILE} (first difference at {diff}); re-export it")
  return model, params


def _numpy_tree(tree):
  """Nested dict of arrays -> the same of float32 NumPy arrays (dicts, so msgpack writes plain
  maps)."""
  if hasattr(tree, "items"):
    return {k: _numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)
