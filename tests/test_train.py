"""End-to-end: a smoke run writes metrics and checkpoints; stop + resume == uninterrupted."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from vit_accel import run_identity, step_plan, train
from vit_accel.errors import UserError
from vit_accel.metric_writer import read_metrics
from vit_accel.modes import eval as eval_mode


def read_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def load_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def test_smoke_run_writes_metrics_and_checkpoints(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"eval.at_start": True, "eval.every_steps": 2, "eval.at_progress": (0.4,)})
  result = train.train_and_evaluate(config, workdir)
  assert 0.0 <= result["knn_top1"] <= 1.0
  assert 0.0 <= result["linear_top1"] <= 1.0
  lines = read_lines(workdir)
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6]
  for l in train_lines:
    for key in ("loss", "lr", "stage", "seq_len", "budget_units", "wall_s", "train_wall_s",
                "input_wait_s", "input_wait_fraction"):
      assert key in l, key
    assert np.isfinite(l["loss"])
    assert 0.0 <= l["input_wait_fraction"] <= 1.0 and 0.0 <= l["input_wait_s"] < l["train_wall_s"]
    assert 0 < l["train_wall_s"] < l["wall_s"]  # the evaluation at step 0 is not training time
  assert train_lines[-1]["budget_units"] > train_lines[0]["budget_units"]
  evals = [l for l in lines if "knn_top1" in l]
  # start, periodic, 40% of the budget (6.5 steps bought, 6 run: first at 40% is step 3), final
  assert [l["step"] for l in evals] == [0, 2, 3, 4, 6]
  assert [l["knn_bank"] for l in evals] == [400, 100, 100, 100, 400]  # final-protocol sizes at 0 and end
  assert all("linear_top1" in l for l in evals)
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())[-1] == 6

  # --mode=eval on the saved checkpoints: the last one reproduces the run's final evaluation.
  again = eval_mode.run(config, workdir)
  assert (again["checkpoint_step"], again["evaluated_by"]) == (6, "mode=eval")
  assert again["knn_top1"] == evals[-1]["knn_top1"]
  assert again["linear_top1"] == evals[-1]["linear_top1"]
  assert read_lines(workdir)[-1]["checkpoint_step"] == 6
  config.eval.checkpoint_step = 5
  with pytest.raises(UserError, match="saved steps: 2, 4, 6"):
    eval_mode.run(config, workdir)


@pytest.mark.slow
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


def test_invalid_config_fails_before_compiling(tmp_path):
  with pytest.raises(UserError, match="patch_size"):
    train.train_and_evaluate(tiny_config(**{"model.patch_size": 5}), str(tmp_path / "a"))
  with pytest.raises(UserError, match="objective"):
    train.train_and_evaluate(tiny_config(objective="byol"), str(tmp_path / "b"))
  assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving_the_bad_state(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=2), workdir)
  # A learning rate this large overflows the parameters to inf within a step or two.
  overflow = {"optim.base_lr": 1e38, "optim.warmup_fraction": 0.0}
  with pytest.raises(UserError, match=r"non-finite loss .* at step .*the last good checkpoint "
                                      r"\(step 2\) is kept"):
    train.train_and_evaluate(tiny_config(**overflow), workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2]
  params = load_params(workdir, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  # A run that diverges before its first checkpoint says that nothing was kept.
  with pytest.raises(UserError, match=r"non-finite loss .* nothing was saved \(no checkpoint"):
    train.train_and_evaluate(tiny_config(**overflow), str(tmp_path / "fresh"))


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


def test_a_slow_input_pipeline_shows_as_input_wait(tmp_path, monkeypatch, needs_fashion_mnist):
  import time
  real = train.streams.global_batches

  def slow(*args, **kwargs):   # the real batches, each 0.5 s late: far slower than the tiny step
    for batch in real(*args, **kwargs):
      time.sleep(0.5)
      yield batch

  monkeypatch.setattr(train.streams, "global_batches", slow)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=4), workdir)
  lines = [l for l in read_lines(workdir) if "loss" in l]
  assert [l["step"] for l in lines] == [2, 4]
  for l in lines:   # 2 steps x 0.5 s waited per interval, the step itself a few ms
    assert l["input_wait_fraction"] > 0.3, l
  assert lines[-1]["input_wait_s"] >= 4 * 0.5 - 0.05


MULTI = "0.4:keep0.25|keep0.25; 0.7:keep0.5; 1:full"


@pytest.fixture
def without_compile_cache():
  """The session's persistent compile cache off for one test, then back as it was: a test that
  counts compilations then counts the same whatever earlier tests left in the cache."""
  from jax.experimental.compilation_cache import compilation_cache
  saved = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()   # JAX decides once per process whether it uses the cache
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", saved)
    compilation_cache.reset_cache()


@pytest.mark.slow
def test_multistage_run_compiles_one_step_per_stage_and_logs_stages(tmp_path, needs_fashion_mnist,
                                                                      without_compile_cache):
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  # A first run pays the process's one-time compilations (evaluation maths, host-side helpers);
  # only the two runs after it are counted, so the test gives the same counts run alone or after
  # any other test.
  train.train_and_evaluate(tiny_config(), str(tmp_path / "warm"))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.train_and_evaluate(tiny_config(), str(tmp_path / "one"))
    single = len(compiles)
    compiles.clear()
    train.train_and_evaluate(tiny_config(schedule=MULTI), str(tmp_path / "multi"))
    multi = len(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # Same run structure, two more stage signatures: exactly two more compilations, none in the loop.
  assert multi == single + 2
  lines = [l for l in read_lines(str(tmp_path / "multi")) if "loss" in l]
  assert [l["seq_len"] for l in lines][0] == 17 and lines[-1]["seq_len"] == 65
  assert {l["stage"] for l in lines} == {0, 1, 2}
  with open(tmp_path / "multi" / "plan.json") as f:
    plan = json.load(f)
  assert [s["seq_len"] for s in plan["stages"]] == [17, 33, 65]
  assert plan["stages"][1]["key_seq_len"] == 65   # 'keep0.5' compresses the query only
  units = [l["budget_units"] for l in lines]
  assert units == sorted(units) and units[-1] <= plan["budget"]


@pytest.fixture(scope="module")
def multistage_straight(tmp_path_factory):
  """One uninterrupted 3-stage run, shared by the resume cases (each run compiles 3 programs)."""
  workdir = str(tmp_path_factory.mktemp("multistage") / "straight")
  train.train_and_evaluate(tiny_config(schedule=MULTI), workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("where", ["boundary", "mid_stage"])
def test_multistage_resume_gives_identical_parameters(tmp_path, where, multistage_straight,
                                                      needs_fashion_mnist):
  config = tiny_config(schedule=MULTI)
  plan = step_plan.make_step_plan(config, 60000)
  stop = plan.stages[1].start_step if where == "boundary" else plan.stages[1].start_step + 1
  assert plan.stages[1].num_steps > 1
  stopped = str(tmp_path / "stopped")
  train.train_and_evaluate(tiny_config(schedule=MULTI, stop_at_step=stop), stopped)
  train.train_and_evaluate(config, stopped)
  a = load_params(multistage_straight, plan.total_steps)
  b = load_params(stopped, plan.total_steps)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_changing_the_schedule_of_a_run_is_refused_unless_allowed(tmp_path, needs_fashion_mnist):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(stop_at_step=2), workdir)
  with pytest.raises(UserError, match="step plan .*allow_schedule_change"):
    train.train_and_evaluate(tiny_config(schedule=MULTI), workdir)
  result = train.train_and_evaluate(tiny_config(schedule=MULTI, allow_schedule_change=True),
                                    workdir)
  assert "knn_top1" in result


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_reported_moved_aside_and_the_previous_one_used(
    tmp_path, capsys, needs_fashion_mnist):
  straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
  train.train_and_evaluate(tiny_config(), straight)
  train.train_and_evaluate(tiny_config(stop_at_step=4), damaged)
  state_dir = os.path.join(damaged, "checkpoints", "4", "state")
  for root, _, files in os.walk(state_dir):   # truncate every file of the latest checkpoint
    for name in files:
      open(os.path.join(root, name), "w").close()
  train.train_and_evaluate(tiny_config(), damaged)
  assert "checkpoint 4 is unreadable" in capsys.readouterr().out
  assert os.path.isdir(os.path.join(damaged, "checkpoints.corrupt", "4"))   # kept, not deleted
  jax.tree.map(np.testing.assert_array_equal, load_params(straight, 6), load_params(damaged, 6))


def test_checkpoint_of_an_older_train_state_format_is_refused_before_restoring():
  cfg = tiny_config()
  current = run_identity.run_metadata(cfg, step_plan.make_step_plan(cfg, 1000), {}, online=False)
  run_identity.check_resumable(dict(current), current, "/run/checkpoints", False)
  older = {k: v for k, v in current.items() if k != "state_format"}   # written before format 2
  with pytest.raises(UserError, match="train-state format 1 .* use a new --workdir"):
    run_identity.check_resumable(older, current, "/run/checkpoints", False)


@pytest.mark.parametrize("recipe,compressed", [("simclr", "keep0.5"),
                                                ("dino", "keep0.5|keep0.5|patch8")])
def test_each_objective_trains_a_compressed_then_full_run(tmp_path, recipe, compressed,
                                                          needs_fashion_mnist):
  """With the MoCo-v3 smoke run above, the fast tier's real train step of every objective: two
  stages (compressed - for DINO every branch: student, teacher, local crops - then full length),
  finite losses logged per stage, a final evaluation."""
  config = tiny_config(steps=4, schedule=f"0.5:{compressed}; 1:full", recipe=recipe,
                       **{"eval.at_start": False})
  workdir = str(tmp_path / recipe)
  result = train.train_and_evaluate(config, workdir)
  lines = read_metrics(workdir, kind="train")
  assert {l["stage"] for l in lines} == {0, 1}
  assert all(np.isfinite(l["loss"]) and l["grad_norm"] > 0 for l in lines)
  assert lines[0]["seq_len"] < lines[-1]["seq_len"]
  assert 0.0 < result["knn_top1"] <= 1.0


@pytest.mark.slow
def test_a_fresh_run_starts_from_another_runs_weights_with_init_workdir(tmp_path,
                                                                         needs_fashion_mnist):
  """init.workdir: the trained network, EMA copy and objective state (DINO's centre) of the source
  run's latest checkpoint, at step 0 with a fresh optimiser state - even when the source's
  optimiser had another structure (no clipping); a resume reads its own checkpoint, not the source
  (which may be gone), and refuses another source; a bad source is one UserError before the new
  run's directory exists."""
  from vit_accel import run_setup
  source = str(tmp_path / "source")
  # No clipping in the source, clipping (DINO's recipe: 3.0) in the warm run: other optimiser trees.
  train.train_and_evaluate(tiny_config(steps=4, recipe="dino", **{"optim.grad_clip": 0.0}), source)
  saved = ocp.StandardCheckpointer().restore(os.path.join(source, "checkpoints", "4", "state"))
  warm_config = lambda **kw: tiny_config(steps=4, recipe="dino", **{"init.workdir": source, **kw})  # noqa: E731
  config = warm_config()
  assert config.optim.grad_clip > 0
  run = run_setup.build(config)
  fresh = run.fresh_state()
  warm = train.initial_state(run)
  assert int(warm.step) == 0
  assert jax.tree.structure(warm) == jax.tree.structure(fresh)   # the compiled step's own tree
  for part in ("params", "ema_params", "extra"):
    jax.tree.map(np.testing.assert_array_equal, getattr(warm, part), saved[part])
    # ...which are not what a random start holds (the centre starts at zero)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(getattr(warm, part)),
                                                        jax.tree.leaves(getattr(fresh, part))))
  jax.tree.map(np.testing.assert_array_equal, warm.opt_state, fresh.opt_state)
  config.init.checkpoint_step = 2   # an earlier one, by step
  jax.tree.map(np.testing.assert_array_equal, train.initial_state(run).params,
               load_params(source, 2))

  # Trains on from there, in one go or interrupted; the resume does not read the source.
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train.train_and_evaluate(warm_config(), whole)
  train.train_and_evaluate(warm_config(stop_at_step=2), parts)
  os.rename(source, source + ".moved")
  with pytest.raises(UserError, match=r"init.workdir=.*elsewhere"):   # another source: another run
    train.train_and_evaluate(warm_config(**{"init.workdir": source + "/elsewhere"}), parts)
  train.train_and_evaluate(warm_config(), parts)
  assert [l["step"] for l in read_lines(parts) if "loss" in l] == [2, 4]
  jax.tree.map(np.testing.assert_array_equal, load_params(parts, 4), load_params(whole, 4))
  os.rename(source + ".moved", source)

  for name, overrides, error in [
      ("a", {"init.workdir": str(tmp_path / "nowhere")}, r"init.workdir=.* holds no checkpoints/"),
      ("b", {"init.workdir": source}, r"holds a dino run, this run is mocov3; point init"),
      ("b2", {"init.workdir": source, "recipe": "dino", "dino.out_dim": 128},
       r"another train state \(.*\); point init.workdir="),
      ("c", {"init.workdir": source, "init.checkpoint_step": 3}, r"init.checkpoint_step=3 is not"),
  ]:
    with pytest.raises(UserError, match=error):
      train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / name))
    assert not (tmp_path / name).exists()   # nothing created
  with pytest.raises(UserError, match=r"this run's own --workdir"):
    train.train_and_evaluate(warm_config(**{"init.workdir": str(tmp_path / "d")}),
                             str(tmp_path / "d"))
  assert os.listdir(os.path.join(source, "checkpoints"))   # the source is only read


@pytest.mark.parametrize("recipe", ["simclr", "mocov3"])
def test_a_warm_start_of_each_objective_restores_its_own_tree(tmp_path, recipe,
                                                              needs_fashion_mnist):
  """Objectives without an EMA copy or extra state (SimCLR: both {}) or with one (MoCo-v3's key
  encoder) warm-start into the train state's own tree, with the source's trained weights."""
  from vit_accel import run_setup
  source = str(tmp_path / "source")
  train.train_and_evaluate(tiny_config(steps=2, recipe=recipe), source)
  run = run_setup.build(tiny_config(steps=2, recipe=recipe, **{"init.workdir": source}))
  fresh, warm = run.fresh_state(), train.initial_state(run)
  assert jax.tree.structure(warm) == jax.tree.structure(fresh)
  jax.tree.map(np.testing.assert_array_equal, warm.params, load_params(source, 2))
  assert int(warm.step) == 0


def test_compile_cache_dir_takes_effect_in_a_process_that_already_compiled(tmp_path):
  # JAX opens its persistent cache once, at a process's first compilation: a process that compiled
  # with one cache directory (as a notebook, a test session or a sweep does) must still send a
  # run's programs to the run's compile_cache_dir.
  import ml_collections
  from jax.experimental.compilation_cache import compilation_cache
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  first, cache = tmp_path / "first", tmp_path / "xla"
  try:
    jax.config.update("jax_compilation_cache_dir", str(first))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)   # cache even these
    compilation_cache.reset_cache()
    jax.jit(lambda x: (x + 1.0).sum())(np.arange(5.0))
    assert os.listdir(first)   # the process's cache is open, at the first directory
    train.use_compilation_cache(ml_collections.ConfigDict({"compile_cache_dir": str(cache)}))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.jit(lambda x: (x * 3.0 + 7.0).sum())(np.arange(11.0))
    assert cache.is_dir() and os.listdir(cache)
  finally:
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    compilation_cache.reset_cache()
