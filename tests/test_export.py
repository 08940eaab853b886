"""--mode=export: the exported safetensors + config.json compute our backbone's CLS features in
timm's layout (checked with a NumPy forward pass written from timm's VisionTransformer, reading only
the exported files), carry timm's names and shapes, and the Flax msgpack loads back to the same
model. torch and timm are not needed (bench/timm_check.py compares with real timm where installed)."""
import importlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vit_accel import checkpointing, export, run_setup
from vit_accel.compression import Strategy
from vit_accel.errors import UserError
from vit_accel.models.vit import VisionTransformer
from vit_accel.modes import export as export_mode
from vit_accel.train_step import normalize_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/fmnist_mocov3.py:smoke"
_erf = np.vectorize(math.erf, otypes=[np.float64])


def smoke_config(recipe="mocov3", **overrides):
  """The recipe's smoke config (2 blocks, width 64, 2 heads, patch 4 on 32 px), no compile cache."""
  c = importlib.import_module(f"configs.fmnist_{recipe}").get_config("smoke")
  c.compile_cache_dir = ""
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def backbone_of(config, patch_size=None):
  m = config.model
  return VisionTransformer(width=m.width, depth=m.depth, num_heads=m.num_heads,
                           mlp_ratio=m.mlp_ratio, patch_size=patch_size or m.patch_size,
                           image_size=m.image_size)


def perturbed(tree, seed):
  """Every parameter moved by N(0, 0.1): zero biases and unit LayerNorm scales of a fresh init
  would hide a bias or scale put in the wrong place."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


def fresh_backbone(config, seed=0):
  model = backbone_of(config)
  size = config.model.image_size
  params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
  return model, jax.device_get(perturbed(params, seed + 1))


def images(config, n=3, seed=0):
  size = config.model.image_size
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def flax_features(config, model, params, uint8_images, strategy=Strategy()):
  x = normalize_images(jnp.asarray(uint8_images), config)
  return np.asarray(model.apply({"params": params}, x, strategy)[0])


# ------------------------------------------------- the reference: timm's ViT, in NumPy (float64)
def _layer_norm(x, w, b, eps=1e-6):   # torch.nn.LayerNorm: biased variance, eps inside the sqrt
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def timm_cls_features(directory, uint8_images):
  """CLS features [B, D] of timm's VisionTransformer(**architecture, num_classes=0) with the
  exported state dict, on `uint8_images` [B, S, S, 3] preprocessed as pretrained_cfg says. Written
  from timm/models/vision_transformer.py (PatchEmbed: Conv2d stride p, flatten(2).transpose(1, 2);
  _pos_embed: cat(cls, x) + pos_embed; Block: x + attn(norm1(x)), x + mlp(norm2(x)); Attention:
  qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4), softmax(q k^T * hd^-0.5) v,
  transpose(1, 2).reshape(B, N, D), proj; Mlp: fc2(GELU(fc1(x))), nn.GELU exact; final norm,
  global_pool 'token': x[:, 0]). Reads only model.safetensors and config.json."""
  with open(os.path.join(directory, export.CONFIG_FILE)) as f:
    cfg = json.load(f)
  arch, pre = cfg["architecture"], cfg["pretrained_cfg"]
  assert (arch["global_pool"], arch["class_token"], arch["no_embed_class"], arch["qkv_bias"],
          arch["pre_norm"], arch["fc_norm"], arch["init_values"], arch["num_classes"]) == (
              "token", True, False, True, False, False, None, 0)
  sd = {k: v.astype(np.float64) for k, v in
        load_file(os.path.join(directory, export.SAFETENSORS_FILE)).items()}
  x = uint8_images.astype(np.float64) / 255.0
  x = ((x - np.asarray(pre["mean"])) / np.asarray(pre["std"])).transpose(0, 3, 1, 2)   # NCHW
  b, c, s, _ = x.shape
  p, d, heads = arch["patch_size"], arch["embed_dim"], arch["num_heads"]
  assert [c, s, s] == pre["input_size"] and s == arch["img_size"]
  g, hd = s // p, d // heads
  patches = x.reshape(b, c, g, p, g, p)
  tok = np.einsum("bcipjq,dcpq->bijd", patches, sd["patch_embed.proj.weight"]).reshape(b, g * g, d)
  tok = tok + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), tok], axis=1) + sd["pos_embed"]
  n = x.shape[1]
  for i in range(arch["depth"]):
    t = f"blocks.{i}."
    y = _layer_norm(x, sd[t + "norm1.weight"], sd[t + "norm1.bias"])
    qkv = (y @ sd[t + "attn.qkv.weight"].T + sd[t + "attn.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    a = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + o @ sd[t + "attn.proj.weight"].T + sd[t + "attn.proj.bias"]
    y = _layer_norm(x, sd[t + "norm2.weight"], sd[t + "norm2.bias"])
    h = y @ sd[t + "mlp.fc1.weight"].T + sd[t + "mlp.fc1.bias"]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    x = x + h @ sd[t + "mlp.fc2.weight"].T + sd[t + "mlp.fc2.bias"]
  return _layer_norm(x, sd["norm.weight"], sd["norm.bias"])[:, 0]


def timm_names_and_shapes(embed_dim, depth, patch_size, img_size, mlp_ratio, in_chans=3) -> dict:
  """timm VisionTransformer's state dict (num_classes=0, class token, pos_embed with the class
  slot, qkv bias, no layer scale / norm_pre / fc_norm): {name: shape}."""
  d, hidden, n = embed_dim, int(embed_dim * mlp_ratio), (img_size // patch_size) ** 2
  table = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d),
           "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
           "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(depth):
    table.update({f"blocks.{i}.{k}": v for k, v in {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,)}.items()})
  return table


def write(config, params, directory, patch_size=None):
  patch = patch_size or config.model.patch_size
  params = export.resize_to_patch(params, patch, config.model.image_size)
  meta = export.export_config(model_cfg=config.model, data_cfg=config.data, patch_size=patch,
                              source={"test": True})
  return export.write_export(str(directory), params, meta)


# ------------------------------------------------------------------------------------- tests
def test_exported_safetensors_compute_our_cls_features_in_timms_layout(tmp_path):
  config = smoke_config(**{"data.mean": (0.2, 0.3, 0.4), "data.std": (0.5, 0.25, 0.3)})
  model, params = fresh_backbone(config)
  write(config, params, tmp_path / "e")
  x = images(config)
  ours = flax_features(config, model, params, x)
  ref = timm_cls_features(str(tmp_path / "e"), x)
  assert ref.shape == (3, config.model.width)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  # ...and the features are not the same for every image (a check that could not fail otherwise).
  assert np.abs(ref[0] - ref[1]).max() > 0.1


def test_names_and_shapes_are_timms(tmp_path):
  config = smoke_config()
  _, params = fresh_backbone(config)
  write(config, params, tmp_path / "e")
  sd = load_file(str(tmp_path / "e" / export.SAFETENSORS_FILE))
  m = config.model
  expected = timm_names_and_shapes(m.width, m.depth, m.patch_size, m.image_size, m.mlp_ratio)
  assert {k: v.shape for k, v in sd.items()} == expected
  assert all(v.dtype == np.float32 for v in sd.values())
  np.testing.assert_array_equal(sd["pos_embed"][:, 0], 0.0)   # our CLS has no position embedding
  cfg = json.loads((tmp_path / "e" / export.CONFIG_FILE).read_text())
  assert {k: cfg["architecture"][k] for k in ("embed_dim", "depth", "num_heads", "patch_size",
                                              "img_size", "in_chans", "mlp_ratio")} == {
      "embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32,
      "in_chans": 3, "mlp_ratio": 4.0}
  assert cfg["pretrained_cfg"]["mean"] == list(config.data.mean)
  assert cfg["pretrained_cfg"]["std"] == list(config.data.std)
  assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_export_at_another_patch_size_computes_the_models_patch_strategy(tmp_path):
  config = smoke_config()
  model, params = fresh_backbone(config)
  write(config, params, tmp_path / "e8", patch_size=8)
  sd = load_file(str(tmp_path / "e8" / export.SAFETENSORS_FILE))
  assert sd["patch_embed.proj.weight"].shape == (64, 3, 8, 8)
  assert sd["pos_embed"].shape == (1, 1 + 16, 64)
  x = images(config)
  ours = flax_features(config, model, params, x, Strategy(patch_size=8))
  np.testing.assert_allclose(ours, timm_cls_features(str(tmp_path / "e8"), x), rtol=0, atol=1e-5)
  # The Flax export at patch 8 is a patch-8 model computing the same.
  model8, params8 = export.load_flax_backbone(str(tmp_path / "e8"))
  assert model8.patch_size == 8
  np.testing.assert_allclose(flax_features(config, model8, params8, x), ours, rtol=0, atol=1e-5)
  with pytest.raises(UserError, match=r"export.patch_size=5 does not tile model.image_size=32"):
    export.check_patch_size(5, 32)


def test_flax_msgpack_loads_back_to_identical_features(tmp_path):
  config = smoke_config()
  model, params = fresh_backbone(config)
  write(config, params, tmp_path / "e")
  loaded_model, loaded = export.load_flax_backbone(str(tmp_path / "e"))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  x = images(config)
  np.testing.assert_array_equal(flax_features(config, loaded_model, loaded, x),
                                flax_features(config, model, params, x))
  # A file that does not match config.json is refused by name.
  cfg = json.loads((tmp_path / "e" / export.CONFIG_FILE).read_text())
  cfg["flax"]["depth"] = 3
  (tmp_path / "e" / export.CONFIG_FILE).write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="does not match the architecture"):
    export.load_flax_backbone(str(tmp_path / "e"))


@pytest.mark.parametrize("mistake", ["swap q and k", "heads interleaved", "fc1 not transposed",
                                     "conv kernel reshaped"])
def test_the_reference_catches_layout_mistakes(mistake, tmp_path):
  """The comparison above can fail: each of these plausible export mistakes changes the
  reference's features by far more than its tolerance."""
  config = smoke_config()
  model, params = fresh_backbone(config)
  write(config, params, tmp_path / "e")
  path = str(tmp_path / "e" / export.SAFETENSORS_FILE)
  sd = load_file(path)
  d, heads = 64, 2
  w = sd["blocks.0.attn.qkv.weight"]
  if mistake == "swap q and k":
    sd["blocks.0.attn.qkv.weight"] = np.concatenate([w[d:2 * d], w[:d], w[2 * d:]])
  elif mistake == "heads interleaved":   # (hd, H) order instead of timm's (H, hd)
    sd["blocks.0.attn.qkv.weight"] = np.ascontiguousarray(
        w.reshape(3, heads, d // heads, d).transpose(0, 2, 1, 3).reshape(3 * d, d))
  elif mistake == "fc1 not transposed":
    f = sd["blocks.1.mlp.fc1.weight"]
    sd["blocks.1.mlp.fc1.weight"] = np.ascontiguousarray(f.T.reshape(f.shape))
  else:
    k = params["patch_embed"]["kernel"]   # [p, p, C, D] reshaped to [D, C, p, p] unpermuted
    sd["patch_embed.proj.weight"] = np.ascontiguousarray(np.asarray(k).reshape(64, 3, 4, 4))
  save_file(sd, path)
  x = images(config)
  err = np.abs(flax_features(config, model, params, x) - timm_cls_features(str(tmp_path / "e"), x))
  assert err.max() > 1e-2


# ----------------------------------------------------------------- the driver (--mode=export)
def save_run(config, workdir, steps=(3, 5), seed=0):
  """A run directory with checkpoints at `steps` of a fresh, perturbed state (params and EMA copy
  differ): what --mode=export restores, without training. Returns {step: state saved there}."""
  setup = run_setup.build(config, splits=(), training=False)
  state = setup.fresh_state()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                    every_steps=1, async_save=False)
  saved = {}
  for i, step in enumerate(steps):
    state = state.replace(params=perturbed(state.params, seed + 10 * i),
                          ema_params=perturbed(state.ema_params, seed + 10 * i + 5))
    ckpt.save(step, state, {"wall_s": 1.0}, force=True)
    saved[step] = state
  ckpt.close()
  return saved


def test_export_mode_writes_the_evaluated_weights_of_the_chosen_checkpoint(tmp_path):
  # DINO evaluates its EMA teacher; eval.weights=online picks the student.
  config = smoke_config("dino")
  workdir = str(tmp_path / "run")
  states = save_run(config, workdir)
  state = states[5]
  out = export_mode.run(config, workdir)
  assert out["directory"] == os.path.join(workdir, "export", "step_5") and out["step"] == 5
  assert sorted(os.listdir(out["directory"])) == sorted(
      [export.SAFETENSORS_FILE, export.CONFIG_FILE, export.FLAX_FILE])
  assert os.path.exists(os.path.join(workdir, "config.export.json"))
  cfg = json.loads(open(os.path.join(out["directory"], export.CONFIG_FILE)).read())
  assert cfg["source"]["weights"] == "ema_params" and cfg["source"]["checkpoint_step"] == 5
  model = backbone_of(config)
  x = images(config)
  teacher = flax_features(config, model, jax.device_get(state.ema_params["backbone"]), x)
  student = flax_features(config, model, jax.device_get(state.params["backbone"]), x)
  np.testing.assert_allclose(timm_cls_features(out["directory"], x), teacher, rtol=0, atol=1e-5)
  assert np.abs(teacher - student).max() > 1e-2

  config.eval.weights = "online"
  config.export.checkpoint_step = 3
  out = export_mode.run(config, workdir)
  assert out["directory"] == os.path.join(workdir, "export", "step_3_online")
  _, params = export.load_flax_backbone(out["directory"])
  want = jax.device_get(states[3].params["backbone"])   # step 3's student, exactly
  for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, expected)
  config.export.checkpoint_step = 4
  with pytest.raises(UserError, match="export.checkpoint_step=4 is not in .*saved steps: 3, 5"):
    export_mode.run(config, workdir)
  (tmp_path / "a_file").write_text("not a folder")
  config.export.dir = str(tmp_path / "a_file" / "exports")
  with pytest.raises(UserError, match="export.dir=.* is under .*a_file, a file"):
    export_mode.run(config, workdir)

  # Exporting the same checkpoint again replaces its directory whole, and leaves nothing beside it.
  config.export.checkpoint_step = -1
  config.eval.weights = ""
  config.export.dir = str(tmp_path / "elsewhere")
  first = export_mode.run(config, workdir)["directory"]
  again = export_mode.run(config, workdir)["directory"]
  assert first == again == str(tmp_path / "elsewhere" / "step_5")
  assert os.listdir(tmp_path / "elsewhere") == ["step_5"]
  # Another run's export in a shared export.dir is never replaced.
  other = str(tmp_path / "other_run")
  save_run(config, other, steps=(5,), seed=3)
  before = open(os.path.join(first, export.SAFETENSORS_FILE), "rb").read()
  with pytest.raises(UserError, match=r"holds an export of another run \(.*run\); it is not "
                                      r"replaced"):
    export_mode.run(config, other)
  assert open(os.path.join(first, export.SAFETENSORS_FILE), "rb").read() == before


def _main(workdir, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", SMOKE,
                         "--mode=export", "--config.compile_cache_dir=", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow   # four CLI subprocesses; the driver itself is in the fast tier (above)
def test_main_export_end_to_end_and_bad_input(tmp_path):
  workdir = tmp_path / "run"
  state = save_run(smoke_config(), str(workdir), steps=(4,))[4]
  proc = _main(workdir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  directory = workdir / "export" / "step_4"
  assert f"exported to {directory}" in proc.stdout
  x = images(smoke_config())
  ours = flax_features(smoke_config(), backbone_of(smoke_config()),
                       jax.device_get(state.params["backbone"]), x)   # MoCo-v3: the query encoder
  np.testing.assert_allclose(timm_cls_features(str(directory), x), ours, rtol=0, atol=1e-5)

  # Bad input: one `error:` line, exit 2, the run directory untouched.
  for args, workdir_, expected in [
      ((), tmp_path / "empty", "no checkpoint in"),
      (("--config.export.patch_size=5",), workdir, "export.patch_size=5 does not tile"),
      (("--config.export.checkpoint_step=9",), workdir, "export.checkpoint_step=9 is not in")]:
    os.makedirs(workdir_, exist_ok=True)
    before = sorted(os.listdir(workdir_))
    proc = _main(workdir_, *args)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, (
        proc.stderr[-2000:])
    assert expected in errors[0], errors[0]
    assert sorted(os.listdir(workdir_)) == before
