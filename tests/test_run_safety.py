"""A run never loses work: a checkpoint of another run or another shape is refused in one line with
nothing moved; a failed write names the cause and the last complete checkpoint and leaves nothing
partial; a --workdir that cannot be written is refused before anything starts."""
import errno
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from input_pipeline import fingerprint, sources
from vit_accel import (
  checkpointing,
  errors,
  io,
  optimizer,
  run_identity,
  sharding,
  state,
  step_plan,
  train,
)
from vit_accel.errors import StorageError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(directory):
  """Every file under `directory` with its size and mtime: to prove nothing moved or changed."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A tiny MoCo-v3 run stopped at step 4 (checkpoints 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("saved") / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=4), workdir)
  return workdir


# Every way the config can disagree with the checkpoint's run: (override, the key the error names).
MISMATCHES = [
    ({"mocov3.out_dim": 32}, "mocov3.out_dim"),
    ({"mocov3.proj_hidden_dim": 128}, "mocov3.proj_hidden_dim"),
    ({"mocov3.pred_hidden_dim": 128}, "mocov3.pred_hidden_dim"),
    ({"mocov3.symmetric": False}, "mocov3.symmetric"),
    ({"mocov3.temperature": 0.3}, "mocov3.temperature"),
    ({"model.width": 32, "model.num_heads": 2}, "model.width"),
    ({"model.depth": 3}, "model.depth"),
    ({"model.num_heads": 4}, "model.num_heads"),
    ({"model.mlp_ratio": 2.0}, "model.mlp_ratio"),
    ({"model.patch_size": 8}, "model.patch_size"),
    ({"seed": 1}, "seed"),
    ({"batch_size": 32}, "batch_size"),
    ({"aug.crop_scale": (0.3, 1.0)}, "aug.crop_scale"),
    ({"data.mean": (0.5, 0.5, 0.5)}, "data.mean"),
]


@pytest.mark.slow
@pytest.mark.parametrize("allow_schedule_change", [False, True])
@pytest.mark.parametrize("overrides,key", MISMATCHES, ids=[k for _, k in MISMATCHES])
def test_a_config_of_another_run_is_refused_naming_the_key_and_nothing_moves(
    saved_run, overrides, key, allow_schedule_change, needs_fashion_mnist):
  before = snapshot(saved_run)
  config = tiny_config(allow_schedule_change=allow_schedule_change, **overrides)
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(config, saved_run)
  message = str(error.value)
  assert f"{key}=" in message and "new --workdir" in message and "\n" not in message, message
  assert snapshot(saved_run) == before
  assert not os.path.exists(os.path.join(saved_run, "checkpoints.corrupt"))


@pytest.mark.slow
def test_the_objective_of_another_run_is_refused(saved_run, needs_fashion_mnist):
  before = snapshot(saved_run)
  with pytest.raises(UserError, match="objective='mocov3', this config has objective='simclr'"):
    train.train_and_evaluate(tiny_config(recipe="simclr"), saved_run)
  assert snapshot(saved_run) == before


@pytest.mark.slow
def test_free_keys_may_change_on_resume(saved_run, tmp_path, needs_fashion_mnist):
  """Evaluation, logging and the optimiser's hyperparameters are not the run's identity."""
  import shutil
  copy = str(tmp_path / "copy")
  shutil.copytree(saved_run, copy)
  config = tiny_config(**{"optim.base_lr": 1e-3, "eval.knn_k": 5, "log_every_steps": 1,
                          "stop_at_step": 5})
  train.train_and_evaluate(config, copy)
  assert 5 in checkpointing.Checkpointer(f"{copy}/checkpoints", keep=3, every_steps=1).all_steps()


@pytest.mark.slow
def test_a_shape_mismatch_the_metadata_does_not_name_is_refused_not_quarantined(saved_run):
  """Checkpoints of an older version carry no identity: the saved array shapes decide."""
  config = tiny_config(**{"mocov3.out_dim": 32})
  model = state.build_model(config)
  _, abstract, _ = state.state_layout(config, model, optimizer.make_optimizer(config),
                                      sharding.make_mesh(config))
  before = snapshot(saved_run)
  ckpt = checkpointing.Checkpointer(f"{saved_run}/checkpoints", keep=3, every_steps=2)
  try:
    with pytest.raises(UserError, match=r"another train state \(ema_params\.projector\.fc2\."
                                        r"kernel: float32\[256,64\] saved, "
                                        r"float32\[256,32\] now\)"):
      ckpt.restore_latest_good(abstract)   # no identity check at all: the legacy case
    with pytest.raises(UserError, match="another train state"):
      ckpt.check_compatible(4, abstract)
  finally:
    ckpt.close()
  assert snapshot(saved_run) == before
  assert not os.path.exists(os.path.join(saved_run, "checkpoints.corrupt"))


def test_state_mismatch_names_missing_extra_shape_and_dtype():
  s = jax.ShapeDtypeStruct
  want = {"a": s((2, 3), np.float32), "b": s((4,), np.float32)}
  assert checkpointing.state_mismatch(want, want) is None
  assert "a: float32[2,3] saved, float32[3,2] now" in checkpointing.state_mismatch(
      want, {**want, "a": s((3, 2), np.float32)})
  assert "bfloat16[4] now" in checkpointing.state_mismatch(want, {**want, "b": s((4,), "bfloat16")})
  assert "c: this config has it" in checkpointing.state_mismatch(want, {**want, "c": s((1,), "f4")})
  assert "b: saved, but this config has no such" in checkpointing.state_mismatch(
      want, {"a": want["a"]})


def test_identity_is_every_key_but_the_free_ones_so_new_keys_are_covered():
  config = tiny_config()
  ident = run_identity.identity(config, {"train_examples": 10})
  assert ident["data_fingerprint.train_examples"] == 10
  assert "mocov3.out_dim" in ident and "aug.crop_scale" in ident and "model.width" in ident
  for free in ("schedule", "budget", "optim.base_lr", "eval.knn_k", "model.dtype", "data.dir",
               "checkpoint.keep", "mesh.fsdp"):
    assert free not in ident, free
  with config.unlocked():
    config.mocov3.new_head_knob = 3     # a key added later needs no list to be covered
  assert run_identity.identity(config, {})["mocov3.new_head_knob"] == 3
  # A key the checkpoint predates is not held against it.
  assert run_identity.first_difference({"a": 1}, {"a": 1, "b": 2}) is None


def test_a_plan_change_names_what_differs():
  config = tiny_config()
  plan = step_plan.make_step_plan(config, 1000)
  saved = run_identity.run_metadata(config, plan, {}, online=False)
  config.budget = config.budget * 1.01
  current = run_identity.run_metadata(config, step_plan.make_step_plan(config, 1000), {}, online=False)
  with pytest.raises(UserError, match=r"\(step plan.s budget: [\d.]+ there, [\d.]+ now\).*"
                                      r"allow_schedule_change=True"):
    run_identity.check_resumable(saved, current, "/run/checkpoints", False)
  run_identity.check_resumable(saved, current, "/run/checkpoints", True)


def test_data_fingerprint_follows_the_files_not_where_the_folder_is(tmp_path):
  from PIL import Image
  root = tmp_path / "data"
  for split in ("train", "test"):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")

  def fp(data_dir):
    config = tiny_config(**{"data.source": "image_folder", "data.dir": str(data_dir)})
    train_files, _ = sources.index_image_folder(str(data_dir), "train")
    test_files, _ = sources.index_image_folder(str(data_dir), "test")
    return fingerprint.fingerprint(config, train_files, test_files)

  first = fp(root)
  assert first["train_examples"] == 6 and first["test_examples"] == 6
  moved = tmp_path / "moved"
  os.rename(root, moved)
  assert fp(moved) == first                        # the folder may move
  noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  Image.fromarray(noise).save(moved / "train" / "a" / "0.png")
  assert fp(moved)["train_files_sha256"] != first["train_files_sha256"]   # a file's size changed
  os.rename(moved / "train" / "b" / "1.png", moved / "train" / "a" / "9.png")
  changed = fp(moved)
  assert changed["train_examples"] == 6 and changed != first   # same count, another labelling


def test_a_fashion_mnist_run_fingerprints_the_pixels():
  images = np.zeros((4, 32, 32, 1), np.uint8)
  a = fingerprint.fingerprint(None, sources.InMemory(images, np.zeros(4, np.int32)),
                              sources.InMemory(images, np.zeros(4, np.int32)))
  images[0, 0, 0, 0] = 1
  b = fingerprint.fingerprint(None, sources.InMemory(images, np.zeros(4, np.int32)),
                              sources.InMemory(images, np.zeros(4, np.int32)))
  assert a["train_sha256"] != b["train_sha256"] and a["train_examples"] == 4


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_version_resumes_and_is_still_checked(saved_run, tmp_path,
                                                                         needs_fashion_mnist):
  """Older checkpoints' metadata holds objective, model, batch_size and seed at the top; no run."""
  import json
  import shutil
  copy = str(tmp_path / "legacy")
  shutil.copytree(saved_run, copy)
  for step in ("2", "4"):
    meta_file = os.path.join(copy, "checkpoints", step, "meta", "metadata")
    with open(meta_file) as f:
      meta = json.load(f)
    config = tiny_config()
    model = {k: v for k, v in config.model.to_dict().items() if k != "dtype"}
    legacy = {"state_format": meta["state_format"], "objective": "mocov3", "model": model,
              "batch_size": 16, "seed": 0, "plan": meta["plan"], "wall_s": meta["wall_s"]}
    with open(meta_file, "w") as f:
      json.dump(legacy, f)
  before = snapshot(copy)
  with pytest.raises(UserError, match="model.depth=2, this config has model.depth=3"):
    train.train_and_evaluate(tiny_config(**{"model.depth": 3}), copy)
  assert snapshot(copy) == before
  train.train_and_evaluate(tiny_config(stop_at_step=5), copy)   # same config: resumes
  assert max(int(d) for d in os.listdir(os.path.join(copy, "checkpoints"))) == 5


@pytest.mark.slow
def test_a_milestone_reached_again_after_a_kill_is_not_saved_twice(tmp_path, needs_fashion_mnist):
  import shutil
  workdir = str(tmp_path / "run")
  # A milestone between two rolling checkpoints (every 2 steps): at an odd step.
  plan = step_plan.make_step_plan(tiny_config(), 60000)
  fraction = next(f for f in (0.3, 0.4, 0.5, 0.6, 0.7) if plan.step_at_progress(f) % 2)
  milestone = plan.step_at_progress(fraction)
  overrides = {"checkpoint.at_progress": (fraction,)}
  train.train_and_evaluate(tiny_config(stop_at_step=milestone + 1, **overrides), workdir)
  milestones = os.path.join(workdir, checkpointing.MILESTONES)
  assert os.listdir(milestones) == [str(milestone)]
  # As if killed after the milestone and before the next rolling checkpoint was written.
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(milestone + 1)))
  result = train.train_and_evaluate(tiny_config(**overrides), workdir)
  assert "knn_top1" in result and os.listdir(milestones) == [str(milestone)]


# ------------------------------------------------------------------------------ failed writes
def wait_for(path: str, seconds: float = 30.0) -> None:
  """A disk fills while the checkpoint's files are written, after Orbax created its temporary
  directory (in a background thread): the injected fault waits for it, as a real one comes after."""
  import time
  deadline = time.time() + seconds
  while not os.path.exists(path) and time.time() < deadline:
    time.sleep(0.02)


def fail_from_second_save(monkeypatch, code=errno.ENOSPC):
  """Every checkpoint write after the first fails inside Orbax, as a full disk makes it fail:
  after Orbax created the checkpoint's temporary directory."""
  original = ocp.StandardCheckpointHandler.async_save
  calls = []

  async def failing(self, directory, *args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
      wait_for(os.path.dirname(str(directory)))
      raise OSError(code, os.strerror(code))
    return await original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_names_the_cause_and_the_last_complete_checkpoint_and_resumes_cleanly(
    tmp_path, monkeypatch, async_save, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  fail_from_second_save(monkeypatch)
  with pytest.raises(StorageError) as error:
    train.train_and_evaluate(tiny_config(**{"checkpoint.async_save": async_save}), workdir)
  message = str(error.value)
  assert "No space left on device" in message, message
  assert "the last complete checkpoint is step 2" in message and "\n" not in message, message
  ckpts = os.path.join(workdir, "checkpoints")
  assert checkpointing.Checkpointer(ckpts, keep=3, every_steps=2, read_only=True).all_steps() == [2]
  monkeypatch.undo()
  result = train.train_and_evaluate(tiny_config(**{"checkpoint.async_save": async_save}), workdir)
  assert "knn_top1" in result
  # The resumed run removed any unfinished save an Orbax background thread left behind.
  assert sorted(os.listdir(ckpts)) == ["2", "4", "6"]


@pytest.mark.slow
def test_a_failed_metrics_write_is_a_storage_error_and_the_checkpoints_are_whole(
    tmp_path, monkeypatch, needs_fashion_mnist):
  from vit_accel import metric_writer
  original = metric_writer.MetricWriter.write

  def write(self, step, metrics, *, kind):
    if step >= 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.jsonl")
    return original(self, step, metrics, kind=kind)

  monkeypatch.setattr(metric_writer.MetricWriter, "write", write)
  workdir = str(tmp_path / "run")
  with pytest.raises(StorageError, match=r"writing to .* failed \(No space left on device: "
                                         r"metrics\.jsonl\); "
                                         r"the last complete checkpoint is step 4"):
    train.train_and_evaluate(tiny_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_a_save_that_fails_for_another_reason_is_not_called_a_storage_failure(tmp_path,
                                                                              monkeypatch):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "c"), keep=2, every_steps=1, async_save=False)

  def broken(*args, **kwargs):
    raise TypeError("a bug, not a disk")

  monkeypatch.setattr(ckpt._manager, "save", broken)
  with pytest.raises(TypeError, match="a bug"):
    ckpt.save(1, {"x": np.zeros(2)}, {})
  assert errors.is_storage_failure(ValueError("RESOURCE_EXHAUSTED: Error writing x"))
  assert errors.storage_cause(ValueError("...: No space left on device")) == \
      "No space left on device"
  ckpt.close()


WRAPPER = """
import errno, os, runpy, sys
sys.path.insert(0, os.getcwd())
import orbax.checkpoint as ocp
original = ocp.StandardCheckpointHandler.async_save
calls = []
async def failing(self, directory, *args, **kwargs):
  calls.append(1)
  if len(calls) > 1:
    import time
    deadline = time.time() + 30   # as a real fault: after Orbax created the step's directory
    while not os.path.exists(os.path.dirname(str(directory))) and time.time() < deadline:
      time.sleep(0.02)
    raise OSError(errno.EIO, os.strerror(errno.EIO))
  return await original(self, directory, *args, **kwargs)
ocp.StandardCheckpointHandler.async_save = failing
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.slow
def test_cli_a_failed_save_is_one_error_line_exit_4_and_no_traceback(tmp_path,
                                                                       needs_fashion_mnist):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-c", WRAPPER, "--config=configs/fmnist_mocov3.py:smoke",
                         f"--workdir={workdir}", "--config.compile_cache_dir=",
                         "--config.tensorboard=False"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 4, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Input/output error" in errors[0] and "last complete checkpoint is step 10" in errors[0]
  assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == ["10"]


# ------------------------------------------------------------------------------------ workdir
def test_workdir_checks(tmp_path, monkeypatch):
  io.check_workdir(str(tmp_path / "new" / "run"))          # creatable: fine, and nothing created
  assert not (tmp_path / "new").exists()
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    io.check_workdir(str(tmp_path / "file"))
  with pytest.raises(UserError, match=f"is under {tmp_path / 'file'}, a file"):
    io.check_workdir(str(tmp_path / "file" / "run"))

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
  with pytest.raises(UserError, match="is not writable: Read-only file system"):
    io.check_workdir(str(tmp_path))
  assert os.listdir(tmp_path) == ["file"]
  monkeypatch.undo()
  os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
  with pytest.raises(UserError, match="is a broken symbolic link"):
    io.check_workdir(str(tmp_path / "dangling" / "run"))


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
  path = str(tmp_path / "plan.json")
  io.atomic_write_text(path, "old")
  monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC,
                                                                                  "full")))
  with pytest.raises(OSError):
    io.atomic_write_text(path, "new")
  assert open(path).read() == "old" and os.listdir(tmp_path) == ["plan.json"]
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_an_online_run_resumes_only_under_the_rules_it_decided_by():
  from vit_accel.schedule_search import RULES_VERSION
  config = tiny_config(steps=100, schedule="online")
  plan = step_plan.make_step_plan(config, 1000)
  saved = run_identity.run_metadata(config, plan, {}, online=True)
  run_identity.check_resumable(saved, saved, "/run/checkpoints", False)
  for key, value in (("search.monotone", True), ("search.final_full", False),
                     ("search.tie_tolerance", 0.2), ("grad_error.ci_level", 0.5),
                     ("search.prior", "1:full"), ("online.ties", "tolerance"),
                     ("online.measure_fraction", 0.5), ("grad_error.metric", "adam")):
    changed = tiny_config(steps=100, schedule="online", **{key: value})
    current = run_identity.run_metadata(changed, step_plan.make_step_plan(changed, 1000), {},
                                        online=True)
    fix = f"resume with --config.{key}=" if not key.startswith("online.") else "restore"
    with pytest.raises(UserError, match=re.escape(key) + r": .* there, .* now.*" + re.escape(fix)):
      run_identity.check_resumable(saved, current, "/run/checkpoints", False)
    run_identity.check_resumable(saved, current, "/run/checkpoints", True)
  # A checkpoint from before the rules were recorded still resumes.
  older = dict(saved, plan={k: v for k, v in saved["plan"].items() if k != "rules"})
  run_identity.check_resumable(older, saved, "/run/checkpoints", False)
  # One saved before search.prior existed decided without a prior: it resumes without one, and
  # with the default prior the error names the key and the value it was decided under.
  rules = {k: v for k, v in saved["plan"]["rules"].items() if k != "search.prior"}
  before_prior = dict(saved, plan=dict(saved["plan"], rules=rules))
  with pytest.raises(UserError, match=r"search.prior: '' there, 'dynamic' now.*"
                                      r"resume with --config.search.prior=''"):
    run_identity.check_resumable(before_prior, saved, "/run/checkpoints", False)
  # One saved before grad_error.metric existed measured in the paper's (Euclidean) coordinates.
  rules = {k: v for k, v in saved["plan"]["rules"].items() if k != "grad_error.metric"}
  before_metric = dict(saved, plan=dict(saved["plan"], rules=rules))
  run_identity.check_resumable(before_metric, saved, "/run/checkpoints", False)
  adam = tiny_config(steps=100, schedule="online", **{"grad_error.metric": "adam"})
  with pytest.raises(UserError, match=r"grad_error.metric: 'euclidean' there, 'adam' now"):
    run_identity.check_resumable(before_metric, run_identity.run_metadata(
        adam, step_plan.make_step_plan(adam, 1000), {}, online=True), "/run/checkpoints", False)
  # One whose decisions followed older rules (schedule_search.RULES_VERSION) is refused unless
  # the plan may change.
  older_rules = dict(saved, plan=dict(saved["plan"], rules=dict(saved["plan"]["rules"],
                                                                 version=1)))
  with pytest.raises(UserError, match=rf"rules.version: 1 there, {RULES_VERSION} now.*finish "
                                      r"it with the vit-accel that started it"):
    run_identity.check_resumable(older_rules, saved, "/run/checkpoints", False)
  run_identity.check_resumable(older_rules, saved, "/run/checkpoints", True)
  # (without a prior, this budget only pays for the measurements under a wider cap)
  online = dict(before_prior["plan"]["online"], measure_fraction=1.0)
  before_prior = dict(before_prior, plan=dict(before_prior["plan"], online=online))
  unprimed = tiny_config(steps=100, schedule="online",
                         **{"search.prior": "", "online.measure_fraction": 1.0})
  run_identity.check_resumable(before_prior, run_identity.run_metadata(
      unprimed, step_plan.make_step_plan(unprimed, 1000), {}, online=True), "/run/checkpoints",
      False)
