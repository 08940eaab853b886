"""--mode=finetune: layer-wise lr decay, weight-decay mask, schedule and label-smoothed loss against
closed forms; plan checks; end to end on a tiny pretrained run, from a random backbone, and without
a checkpoint (one error line, exit code 2, nothing written)."""
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from input_pipeline import pipeline, sources
from vit_accel import config_checks, finetune, run_setup, sharding, state, train
from vit_accel.errors import UserError
from vit_accel.metric_writer import read_metrics
from vit_accel.modes import finetune as finetune_mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def classifier_params(config, num_classes=10):
  """Abstract parameters of the fine-tune classifier (shapes only: nothing is computed)."""
  model = finetune.build_classifier(config, num_classes)
  size = config.model.image_size
  return jax.eval_shape(lambda r: model.init(r, jnp.zeros((2, size, size, 3)))["params"],
                        jax.random.key(0))


def test_layer_decay_multipliers_per_parameter_path():
  config = tiny_config(**{"model.depth": 2})
  flat = flax.traverse_util.flatten_dict(
      finetune.layer_decay_multipliers(classifier_params(config), depth=2, decay=0.5))
  expected = {"head": 1.0, "norm": 1.0, "block1": 0.5, "block0": 0.25, "patch_embed": 0.125,
              "pos_embed": 0.125, "cls_token": 0.125}
  seen = set()
  for path, value in flat.items():
    group = path[0] if path[0] == "head" else path[1]
    assert value == expected[group], (path, value)
    seen.add(group)
  assert seen == set(expected)
  assert flat["backbone", "block0", "mlp", "fc1", "kernel"] == 0.25
  assert flat["head", "bias"] == 1.0
  with pytest.raises(ValueError, match="backbone/extra"):
    finetune.layer_decay_multipliers({"backbone": {"extra": jnp.zeros(3)}}, depth=2, decay=0.5)
  with pytest.raises(ValueError, match="block2"):   # a block beyond the depth has no layer
    finetune.layer_decay_multipliers({"backbone": {"block2": jnp.zeros(3)}}, depth=2, decay=0.5)


def test_optimizer_scales_each_update_by_its_layer_and_decays_matrices_only():
  config = tiny_config(**{"model.depth": 2, "finetune.base_lr": 0.256, "finetune.batch_size": 100,
                          "finetune.warmup_fraction": 0.0, "finetune.layer_decay": 0.5,
                          "finetune.weight_decay": 0.0})
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), classifier_params(config))
  peak = 0.256 * 100 / 256
  multipliers = finetune.layer_decay_multipliers(params, 2, 0.5)
  tx = finetune.make_optimizer(config, params, total_steps=10)
  # Step 0 without warm-up: lr = peak; Adam's first step moves every weight by lr (|g| >> eps).
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  jax.tree.map(lambda u, m: np.testing.assert_allclose(u, -peak * m, rtol=1e-5), updates,
               multipliers)
  # Zero gradient: only the weight decay moves parameters, matrices only (optimizer.py's rule).
  config.finetune.weight_decay = 0.1
  tx = finetune.make_optimizer(config, params, total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat = flax.traverse_util.flatten_dict(updates)
  mults = flax.traverse_util.flatten_dict(multipliers)
  decayed = {p for p, u in flat.items() if np.any(u != 0)}
  assert decayed == {p for p, u in flat.items()
                     if u.ndim > 1 and p[-1] not in ("pos_embed", "cls_token")}
  assert ("head", "kernel") in decayed and ("backbone", "patch_embed", "kernel") in decayed
  for p in decayed:
    np.testing.assert_allclose(flat[p], -peak * mults[p] * 0.1, rtol=1e-6)


def test_learning_rate_warms_up_then_cosine_decays_to_zero():
  config = tiny_config(**{"finetune.base_lr": 0.512, "finetune.batch_size": 128,
                          "finetune.warmup_fraction": 0.2})
  peak = 0.256
  lr = lambda step: float(finetune.learning_rate_at(config, step, 100))  # noqa: E731
  assert lr(0) == 0.0
  np.testing.assert_allclose([lr(10), lr(20), lr(60), lr(100)], [peak / 2, peak, peak / 2, 0.0],
                             atol=1e-7)
  assert lr(30) < lr(20) and lr(80) < lr(60)


def test_label_smoothed_cross_entropy_matches_the_closed_form():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = np.array([0, 4, 2, 2, 1, 3])
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  for s in (0.0, 0.1, 0.5):
    k = logits.shape[1]
    # target mass (1 - s + s/K) on the label, s/K on each other class
    per_example = [-(1 - s + s / k) * log_p[i, y] - s / k * (log_p[i].sum() - log_p[i, y])
                   for i, y in enumerate(labels)]
    got = float(finetune.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), s))
    np.testing.assert_allclose(got, np.mean(per_example), rtol=1e-5)
  plain = float(finetune.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.0))
  np.testing.assert_allclose(plain, -np.mean(log_p[np.arange(6), labels]), rtol=1e-5)


def test_random_backbone_is_the_pretraining_runs_initial_one():
  config = tiny_config()
  size = config.model.image_size
  images = jnp.zeros((2, size, size, 3))
  params = jax.jit(finetune.build_classifier(config, 10).init)(jax.random.key(config.seed),
                                                               images)["params"]
  pretrain = jax.jit(state.build_model(config).init)(jax.random.key(config.seed), images)["params"]
  jax.tree.map(np.testing.assert_array_equal, params["backbone"], pretrain["backbone"])
  assert not np.any(params["head"]["kernel"]) and not np.any(params["head"]["bias"])


def test_plan_counts_steps_and_refuses_impossible_runs():
  mesh = sharding.make_mesh(tiny_config())
  images = np.zeros((1000, 32, 32, 1), np.uint8)
  labelled = sources.InMemory(images, np.arange(1000, dtype=np.int32) % 4)
  plan = finetune.make_plan(tiny_config(**{"finetune.batch_size": 100, "finetune.epochs": 2.5,
                                           "finetune.eval_every_epochs": 1.0}), labelled, mesh)
  assert plan == finetune.Plan(num_classes=4, steps_per_epoch=10, total_steps=25,
                               eval_every_steps=10)
  with pytest.raises(UserError, match="finetune.batch_size=2000 is larger than the 1000"):
    finetune.make_plan(tiny_config(**{"finetune.batch_size": 2000}), labelled, mesh)
  with pytest.raises(UserError, match="finetune.epochs=0.01 is less than one step"):
    finetune.make_plan(tiny_config(**{"finetune.batch_size": 100, "finetune.epochs": 0.01}),
                       labelled, mesh)
  one_class = sources.InMemory(images, np.zeros(1000, np.int32))
  with pytest.raises(UserError, match="1 class"):
    finetune.make_plan(tiny_config(**{"finetune.batch_size": 100, "finetune.epochs": 1.0}),
                       one_class, mesh)


def test_train_batches_are_labelled_augmented_views(needs_fashion_mnist):
  config = tiny_config(**{"finetune.crop_scale": (1.0, 1.0), "finetune.flip": False})
  source = pipeline.load_source(config, "train")
  images, labels = next(finetune.train_dataset(source, config, pipeline.HostShard(0, 1, 32))
                        .as_numpy_iterator())
  assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  # Without crop and flip each view is a training image, with that image's label.
  flat = source.images[..., 0].reshape(source.num_examples, -1).astype(np.int32)
  for image, label in zip(images, labels):
    match = np.abs(flat - image[..., 0].reshape(-1).astype(np.int32)).sum(axis=1)
    assert match.min() == 0 and label in source.labels[match == 0]
  augmented = next(finetune.train_dataset(source, tiny_config(), pipeline.HostShard(0, 1, 32))
                   .as_numpy_iterator())
  np.testing.assert_array_equal(augmented[1], labels)   # same order, other pixels
  assert not np.array_equal(augmented[0], images)


def test_tfds_train_batches_carry_labels(tmp_path):
  import tensorflow_datasets as tfds  # heavy: only this test needs it

  from test_sources import tfds_config
  os.makedirs(tmp_path / "imagenet2012")  # what `tfds build` leaves behind
  config = tfds_config(tmp_path)
  with tfds.testing.mock_data(num_examples=64):
    source = sources.load(config, "train")
    assert finetune.num_classes(source) == 1000
    images, labels = next(finetune.train_dataset(source, config, pipeline.HostShard(1, 2, 16))
                          .as_numpy_iterator())
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8   # 8 = 16 / 2 hosts
  assert labels.shape == (8,) and labels.dtype == np.int32
  assert np.all((labels >= 0) & (labels < 1000))


@pytest.mark.slow
def test_finetune_from_a_pretrained_checkpoint_and_from_random(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  train.train_and_evaluate(config, workdir)
  # The backbone handed to fine-tuning is the checkpoint's (MoCo-v3 evaluates `params`).
  setup = run_setup.build(config, training=False)
  step, backbone = finetune_mode.restore_backbone(config, workdir, setup.restore_target)
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "6", "state"))
  assert step == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(backbone),
               saved["params"]["backbone"])

  config.finetune.eval_every_epochs = 0.025   # 23 of the smoke's 47 steps: evaluations at 23, 46
  line = finetune_mode.run(config, workdir)
  assert (line["kind"], line["init"], line["checkpoint_step"], line["step"]) == (
      "finetune", "checkpoint", 6, 6)
  assert line["test_top1"] > 0.2, line   # 10 classes: chance is 0.1
  assert line["test_examples"] == 10000 and line["finetune_steps"] == 47
  assert np.isfinite(line["train_loss"]) and line["finetune_wall_s"] > 0
  lines = read_metrics(workdir, kind="finetune")
  assert [(l["finetune_steps"], l["final"]) for l in lines] == [(23, False), (46, False),
                                                                  (47, True)]
  assert lines[-1]["test_top1"] == line["test_top1"]
  assert {l["step"] for l in lines} == {6}
  with open(os.path.join(workdir, "config.finetune.json")) as f:
    assert json.load(f)["finetune"]["init"] == "checkpoint"
  config.finetune.checkpoint_step = 5
  with pytest.raises(UserError, match="finetune.checkpoint_step=5 is not in .*saved steps: 2, 4, 6"):
    finetune_mode.run(config, workdir)

  # A fresh backbone needs no checkpoint.
  empty = str(tmp_path / "fresh")
  random_config = tiny_config(**{"finetune.init": "random"})
  line = finetune_mode.run(random_config, empty)
  assert (line["init"], line["checkpoint_step"], line["step"]) == ("random", None, 0)
  assert line["test_top1"] > 0.2, line
  # The same seed, data stream and initial backbone as the pretraining run's step 0: only the
  # checkpoint's 6 steps of pretraining make the two fine-tunes differ.
  assert line["test_top1"] != lines[-1]["test_top1"]
  assert not os.path.exists(os.path.join(empty, "checkpoints"))
  assert [l["init"] for l in read_metrics(empty)] == ["random"]


def test_finetune_without_a_checkpoint_is_one_error_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 3, "kind": "train", "loss": 1.0}\n')
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", "--mode=finetune",
                         "--config=configs/fmnist_mocov3.py:smoke", "--logtostderr",
                         "--verbosity=-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=180)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "no checkpoint in" in errors[0] and "--config.finetune.init=random" in errors[0], errors
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]
  assert (workdir / "metrics.jsonl").read_text() == '{"step": 3, "kind": "train", "loss": 1.0}\n'


@pytest.mark.parametrize("key,value,words", [
    ("finetune.init", "pretrained",
     "finetune.init='pretrained' is out of range: must be one of 'checkpoint', 'random'"),
    ("finetune.layer_decay", 0.0, "finetune.layer_decay=0.0 is out of range"),
    ("finetune.label_smoothing", 1.0, "finetune.label_smoothing=1.0 is out of range"),
    ("finetune.crop_scale", (0.8, 0.5), "finetune.crop_scale=(0.8, 0.5) is out of range"),
])
def test_bad_finetune_values_are_one_line_before_anything_compiles(key, value, words):
  with pytest.raises(UserError, match=re.escape(words)):
    config_checks.validate_config(tiny_config(**{key: value}))


def test_the_mode_is_registered_with_its_config_record():
  from vit_accel import modes
  mode = modes.MODES["finetune"]
  assert (mode.module, mode.reads_data, mode.config_record) == (
      "vit_accel.modes.finetune", True, "config.finetune.json")


def test_top1_streams_the_test_batches_and_ignores_the_padding():
  mesh = sharding.make_mesh(tiny_config())
  batch_sharding = sharding.batch_sharding(mesh)
  # A "classifier" that predicts the image's first pixel: the labels say which are right.
  predict = jax.jit(lambda params, images: images[:, 0, 0, 0].astype(jnp.int32),
                    in_shardings=(None, batch_sharding), out_shardings=batch_sharding)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 10, (23, 4, 4, 3)).astype(np.uint8)
  labels = images[:, 0, 0, 0].astype(np.int32)
  labels[:5] = (labels[:5] + 1) % 10                  # 5 of 23 wrong
  seen = []

  def batches():   # 8, 8, 7: the last one is padded to the compiled batch
    for start in range(0, 23, 8):
      seen.append(start)
      yield images[start:start + 8], labels[start:start + 8]
  accuracy, examples = finetune.top1(predict, {}, batches(), 8, mesh)
  assert examples == 23 and accuracy == pytest.approx(18 / 23)
  assert seen == [0, 8, 16]
