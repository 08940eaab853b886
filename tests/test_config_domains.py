"""Every config value is checked against its domain before anything compiles (config_domains)."""
import importlib

import pytest

from vit_accel import config_checks, config_domains
from vit_accel.errors import UserError

RECIPES = [("fmnist_mocov3", None), ("fmnist_mocov3", "smoke"), ("fmnist_simclr", None),
           ("fmnist_simclr", "smoke"), ("fmnist_dino", None), ("fmnist_dino", "smoke"),
           ("imagenet_mocov3_vit_b16", None), ("imagenet_simclr_vit_b16", None),
           ("imagenet_dino_vit_b16", None), ("imagenet_dino_vit_b16", "vit_s16")]


def recipe(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name,arg", RECIPES)
def test_every_key_of_every_shipped_recipe_has_a_domain_and_is_inside_it(name, arg):
  config = recipe(name, arg)
  missing = sorted(set(config_domains.flatten(config)) - set(config_domains.DOMAINS))
  assert not missing, f"add these keys to config_domains.DOMAINS: {missing}"
  config_domains.check(config)


# (recipe, key, bad value, the words of the one-line error)
BAD = [
    ("fmnist_mocov3", "mocov3.temperature", 0.0, "mocov3.temperature=0.0 is out of range: must be "
     "a number > 0"),
    ("fmnist_mocov3", "mocov3.temperature", -0.2, "must be a number > 0"),
    ("fmnist_simclr", "simclr.temperature", 0.0, "simclr.temperature=0.0"),
    ("fmnist_dino", "dino.teacher_temp", -0.04, "dino.teacher_temp=-0.04"),
    ("fmnist_dino", "dino.student_temp", 0.0, "dino.student_temp=0.0"),
    ("fmnist_mocov3", "mocov3.base_momentum", 1.5, "must be a number in [0, 1]"),
    ("fmnist_dino", "dino.center_momentum", -0.1, "dino.center_momentum=-0.1"),
    ("fmnist_dino", "dino.final_momentum", 1.01, "dino.final_momentum=1.01"),
    ("fmnist_mocov3", "aug.crop_scale", (0.9, 0.2), "aug.crop_scale=(0.9, 0.2) is out of range: "
     "must be 2 values, low <= high, each a number in (0, 1]"),
    ("fmnist_mocov3", "aug.crop_scale", (0.0, 1.0), "aug.crop_scale=(0.0, 1.0)"),
    ("fmnist_dino", "aug.local_crop_scale", (0.4, 0.05), "aug.local_crop_scale"),
    ("fmnist_mocov3", "aug.crop_ratio", (1.33, 0.75), "aug.crop_ratio"),
    ("fmnist_mocov3", "aug.jitter_p", 1.2, "aug.jitter_p=1.2"),
    ("fmnist_mocov3", "aug.blur_p", (0.5, -1.0), "aug.blur_p"),
    ("fmnist_mocov3", "aug.hue", 0.7, "aug.hue=0.7 is out of range: must be a number in [0, 0.5]"),
    ("fmnist_mocov3", "model.depth", 0, "model.depth=0 is out of range: must be an integer >= 1"),
    ("fmnist_mocov3", "model.width", -128, "model.width=-128"),
    ("fmnist_mocov3", "mocov3.out_dim", 0, "mocov3.out_dim=0"),
    ("fmnist_dino", "dino.head_layers", 0, "dino.head_layers=0"),
    ("fmnist_mocov3", "batch_size", 0, "batch_size=0"),
    ("fmnist_mocov3", "optim.base_lr", 0.0, "optim.base_lr=0.0"),
    ("fmnist_mocov3", "optim.b2", 1.0, "optim.b2=1.0 is out of range: must be a number in [0, 1)"),
    ("fmnist_mocov3", "optim.warmup_fraction", 1.5, "optim.warmup_fraction=1.5"),
    ("fmnist_mocov3", "optim.weight_decay", -0.1, "optim.weight_decay=-0.1"),
    ("fmnist_mocov3", "eval.knn_k", 0, "eval.knn_k=0"),
    ("fmnist_mocov3", "eval.knn_temperature", 0.0, "eval.knn_temperature=0.0"),
    ("fmnist_mocov3", "eval.final_bank_size", 0, "must be an integer >= 1 or -1"),
    ("fmnist_mocov3", "eval.at_progress", (0.5, 1.5), "eval.at_progress=(0.5, 1.5)"),
    ("fmnist_mocov3", "checkpoint.every_steps", 0, "checkpoint.every_steps=0"),
    ("fmnist_mocov3", "online.every", 0.0, "online.every=0.0"),
    ("fmnist_mocov3", "pilot.budget_fraction", 0.0, "pilot.budget_fraction=0.0"),
    ("fmnist_mocov3", "data.std", (0.3, 0.0, 0.3), "data.std=(0.3, 0.0, 0.3)"),
    ("fmnist_mocov3", "data.mean", (0.3, 0.3), "data.mean=(0.3, 0.3) is out of range: must be 3"),
    ("fmnist_mocov3", "mesh.fsdp", 0, "mesh.fsdp=0 is out of range: must be an integer >= 1 or -1"),
    ("fmnist_mocov3", "compression.bucket", 0, "compression.bucket=0"),
    ("fmnist_mocov3", "log_every_steps", 0, "log_every_steps=0"),
    ("fmnist_mocov3", "data.bad_images", "ignore", "data.bad_images='ignore' is out of range: "
     "must be one of 'skip', 'fail'"),
    ("fmnist_mocov3", "distributed.timeout_s", 0, "distributed.timeout_s=0"),
]


@pytest.mark.parametrize("name,key,value,words", BAD)
def test_a_value_outside_its_domain_is_one_line_naming_key_value_and_range(name, key, value, words):
  config = recipe(name, "smoke")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError) as error:
    config_checks.validate_config(config)
  message = str(error.value)
  assert words in message and "\n" not in message, message
  assert message.startswith(f"{key}="), message


def test_domains_accept_their_edges_and_sentinels():
  assert config_domains.PROBABILITY.ok(0) and config_domains.PROBABILITY.ok(1.0)
  assert not config_domains.POSITIVE.ok(0) and config_domains.POSITIVE.ok(1e-9)
  assert config_domains.AUTO_OR_COUNT.ok(-1) and not config_domains.AUTO_OR_COUNT.ok(-2)
  assert not config_domains.COUNT.ok(2.5) and not config_domains.COUNT.ok(True)
  assert not config_domains.POSITIVE.ok(float("nan"))
  assert not config_domains.POSITIVE.ok(float("inf"))
  assert config_domains.RANGE_01.ok((0.2, 0.2)) and not config_domains.RANGE_01.ok((0.2,))
  assert config_domains.Optional(config_domains.COUNT).ok(None)
