"""End-to-end: a smoke run writes metrics and checkpoints; stop + resume == uninterrupted."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from vit_accel import train
from vit_accel.errors import UserError


def read_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def load_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def test_smoke_run_writes_metrics_and_checkpoints(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"eval.at_start": True, "eval.every_steps": 2})
  result = train.train_and_evaluate(config, workdir)
  assert 0.0 <= result["knn_top1"] <= 1.0
  lines = read_lines(workdir)
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6]
  for l in train_lines:
    for key in ("loss", "lr", "stage", "seq_len", "budget_units", "wall_s"):
      assert key in l, key
    assert np.isfinite(l["loss"])
  assert train_lines[-1]["budget_units"] > train_lines[0]["budget_units"]
  evals = [l for l in lines if "knn_top1" in l]
  assert [l["step"] for l in evals] == [0, 2, 4, 6]  # start, periodic, final
  assert [l["knn_bank"] for l in evals] == [400, 100, 100, 400]  # final-protocol sizes at 0 and end
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())[-1] == 6


def test_resume_gives_identical_parameters(tmp_path, needs_fashion_mnist):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  train.train_and_evaluate(tiny_config(), straight)
  train.train_and_evaluate(tiny_config(stop_at_step=3), stopped)  # mid-interval: forced save at 3
  assert not [l for l in read_lines(stopped) if "knn_top1" in l]  # no final eval when stopped
  train.train_and_evaluate(tiny_config(), stopped)
  resumed_steps = [l["step"] for l in read_lines(stopped) if "loss" in l]
  assert resumed_steps == [2, 3, 4, 6]  # second invocation starts after step 3
  a, b = load_params(straight, 6), load_params(stopped, 6)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # ...and training did move the parameters.
  changed = jax.tree.map(lambda x, y: not np.array_equal(x, y), a, load_params(stopped, 3))
  assert any(jax.tree.leaves(changed))


def test_resume_refuses_a_different_model(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=2), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(UserError, match="model="):
    train.train_and_evaluate(tiny_config(**{"model.width": 32}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_invalid_config_fails_before_compiling(tmp_path):
  with pytest.raises(UserError, match="patch_size"):
    train.train_and_evaluate(tiny_config(**{"model.patch_size": 5}), str(tmp_path / "a"))
  with pytest.raises(UserError, match="objective"):
    train.train_and_evaluate(tiny_config(objective="byol"), str(tmp_path / "b"))
  assert not (tmp_path / "a").exists()


def test_non_finite_loss_stops_without_saving_the_bad_state(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=2), workdir)
  # A learning rate this large overflows the parameters to inf within a step or two.
  with pytest.raises(UserError, match="non-finite loss .* at step"):
    train.train_and_evaluate(tiny_config(**{"optim.base_lr": 1e38, "optim.warmup_fraction": 0.0}),
                             workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2]
  params = load_params(workdir, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_resume_drops_metrics_logged_past_the_checkpoint(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=4), workdir)
  # As if the process had died after logging step 6 but before checkpointing it.
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
  train.train_and_evaluate(tiny_config(), workdir)
  steps = [l["step"] for l in read_lines(workdir) if "loss" in l]
  assert steps == [2, 4, 6]
  assert all(l["loss"] != 123.0 for l in read_lines(workdir) if "loss" in l)
