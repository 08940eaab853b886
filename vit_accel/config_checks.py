"""Config checks that run before anything compiles: every value in its domain (config_domains), then
the rules that tie keys together. Each failure is a UserError naming the key and the fix."""
from __future__ import annotations

import jax

from input_pipeline import tf_runtime
from vit_accel import compression, config_domains, objectives, step_plan
from vit_accel.errors import UserError
from vit_accel.train_step import num_local_crops


def validate_config(config) -> None:
  """Cheap checks that fail before anything compiles, each naming the key and the fix: every value
  in its domain (config_domains.DOMAINS), then the rules that tie keys together."""
  config_domains.check(config)
  objective = objectives.get(config.objective)
  if config.objective not in config:
    raise UserError(f"objective={config.objective!r} needs a config section "
                    f"'{config.objective}'; start from configs/fmnist_{config.objective}.py")
  if hasattr(objective, "validate_config"):
    objective.validate_config(config)
  if config.eval.weights == "ema" and "backbone" not in objective.EMA_PARTS:
    raise UserError(f"eval.weights='ema': objective {config.objective} keeps no EMA copy of the "
                    f"backbone; use 'online' or ''")
  m = config.model
  if m.patch_size <= 0 or m.image_size % m.patch_size:
    raise UserError(f"model.patch_size={m.patch_size} does not tile model.image_size="
                    f"{m.image_size}; use a divisor of {m.image_size}")
  if m.width % m.num_heads:
    raise UserError(f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}")
  if m.attention == "cudnn":
    head_dim = m.width // m.num_heads
    if jax.default_backend() != "gpu" or m.dtype != "bfloat16" or head_dim % 8 or head_dim > 128:
      raise UserError(f"model.attention=cudnn needs a GPU, model.dtype=bfloat16 and a head dim "
                      f"(model.width / model.num_heads) that is a multiple of 8 up to 128; this is "
                      f"{jax.default_backend()}, {m.dtype}, head dim {head_dim}: use 'auto'")
  if num_local_crops(config):
    local = config.aug.local_size
    if local <= 0 or local % m.patch_size or local > m.image_size:
      raise UserError(f"aug.local_size={local} must be a positive multiple of model.patch_size="
                      f"{m.patch_size} and at most model.image_size={m.image_size}")
  in_memory = config.data.source == "fashion_mnist"
  if config.data.augment_on == "device" and config.aug.downscale == "area":
    raise UserError("aug.downscale='area' is made on the host only; with "
                    "data.augment_on='device' use 'antialias' or 'bilinear'")
  if (config.data.augment_on == "device" and not in_memory
      and config.data.window_size < m.image_size):
    raise UserError(f"data.window_size={config.data.window_size} is smaller than the views "
                    f"(model.image_size={m.image_size}): every view would be enlarged from a "
                    f"shrunk window; use at least {m.image_size} (the default 512 keeps images "
                    f"up to 512 px whole)")
  if not (in_memory and config.data.augment_on == "device") and not tf_runtime.available():
    raise UserError("TensorFlow is not importable here, and the host input pipeline (tf.data: "
                    "every view on a file source, and decoding with data.augment_on='device') "
                    "needs it: run ./setup.sh, or train an in-memory source (fashion_mnist) with "
                    "--config.data.augment_on=device")
  # The source itself is read (and checked) by a fresh run only: train.read_warm_start.
  if config.init.checkpoint_step != -1 and not config.init.workdir:
    raise UserError(f"init.checkpoint_step={config.init.checkpoint_step} needs init.workdir (the "
                    f"run to start from); set it, or leave init.checkpoint_step at -1")
  if config.budget <= 0 and config.budget_epochs <= 0:
    raise UserError("set budget (base-forward units) or budget_epochs (full-cost epochs) > 0")
  specs = {key: step_plan.candidates(config, key)
           for key in ("compression.cost_candidates", "grad_error.candidates", "online.candidates")}
  specs["schedule"] = [s.strategies for s in step_plan.schedule_stages(config)]
  specs["search.prior"] = [compression.BranchStrategies.parse(spec, config.compression.bucket)
                           for _, spec in step_plan.prior_stages(config) or ()]
  if step_plan.is_online(config):
    step_plan.check_prior_measured(config, "online.candidates")
  for key, strategies in specs.items():
    for st in strategies:
      check_local_crops(config, st, key)


def check_local_crops(config, strategies, key: str) -> None:
  """A strategy's local-crop part ('QUERY|KEY|LOCAL') needs an objective that uses local crops and a
  recipe that has some, and the strategy the local crops run must apply to their size; UserError
  naming `key` otherwise."""
  if not (objectives.get(config.objective).LOCAL_CROPS and num_local_crops(config)):
    if strategies.local is not None:
      raise UserError(f"{key}: {strategies.spec!r} has a third part for local crops, but this "
                      f"run has none ({config.objective}, aug.local_crops="
                      f"{config.aug.local_crops}); use 'QUERY' or 'QUERY|KEY'")
    return
  crops = strategies.local_crops
  if crops is not None and crops > num_local_crops(config):
    raise UserError(f"{key}: {strategies.spec!r} runs {crops} local crops, but the recipe makes "
                    f"{num_local_crops(config)} (aug.local_crops); use crops0 to "
                    f"crops{num_local_crops(config)}")
  try:
    strategies.local_strategy.layout(config.aug.local_size, config.model.patch_size)
  except UserError as e:
    raise UserError(f"{key}: {strategies.spec!r} on the {config.aug.local_size}px local crops: "
                    f"{e}; give the local crops their own strategy as a third part, e.g. "
                    f"'{strategies.query.spec}|{strategies.key.spec}|full'") from None
