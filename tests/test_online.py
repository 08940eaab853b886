"""Online adaptive schedule: overhead accounting, switching on measured CA-MSE, exact resume."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from vit_accel import grad_error, step_plan, train
from vit_accel.compression import BranchStrategies
from vit_accel.errors import UserError

KEEP = "keep0.25|keep0.25"


def online_config(steps, **overrides):
  config = tiny_config(steps=steps, schedule="online", **{
      "online.every": 0.5, "online.reference_batches": 2, "online.batches": 2,
      "online.candidates": (KEEP,), "search.tie_tolerance": 0.0, "search.prior": "",
      "online.measure_fraction": 1.0, **overrides})
  return config


def read_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_decisions_charge_their_measurement_and_project_the_rest():
  config = online_config(20, **{"search.final_full": False})
  n = 60000
  undecided = step_plan.make_step_plan(config, n)
  assert [s.spec for s in undecided.stages] == ["full", "full"]
  overhead = undecided.stages[0].start_units
  per_sample = 2 * step_plan.step_cost_units(config, BranchStrategies.parse("full|full")) + \
      2 * step_plan.step_cost_units(config, BranchStrategies.parse(KEEP))
  assert overhead == pytest.approx(per_sample * config.batch_size)  # R full + M keep gradients
  one = step_plan.make_step_plan(config, n, [{"strategy": KEEP, "overhead_units": overhead}])
  assert [s.spec for s in one.stages] == [KEEP, KEEP]  # the rest projected with the last choice
  assert one.total_steps > undecided.total_steps
  for plan in (undecided, one):
    s0, s1 = plan.stages
    assert s1.start_units == pytest.approx(s0.start_units + s0.num_steps * s0.units_per_step
                                           + overhead)
    assert plan.units_at(plan.total_steps) <= plan.budget + 1e-6
  # With search.final_full (the default) the last segment is forecast at full length, unmeasured.
  config.search.final_full = True
  one = step_plan.make_step_plan(config, n, [{"strategy": KEEP, "overhead_units": overhead}])
  assert [s.spec for s in one.stages] == [KEEP, "full"]
  s0, s1 = one.stages
  assert s1.start_units == pytest.approx(s0.start_units + s0.num_steps * s0.units_per_step)


@pytest.mark.slow
@pytest.mark.parametrize("final_full,prior", [(False, ""), (True, ""), (False, "1:full")])
def test_online_switches_when_the_measured_errors_say_so(tmp_path, monkeypatch,
                                                         needs_fashion_mnist, final_full, prior):
  """Constructed measurements: compressed wins (equal CA-MSE, cheaper) in the first half, full
  length in the second. With search.final_full the last segment is full length unmeasured. With a
  full-length prior, the first half's tie leaves the prior in place."""
  calls = []

  def fake_measure(config, state, next_batches, reference_batches, batches, grad_fns, costs, rng,
                   progress, **kwargs):
    calls.append(int(state.step))
    keep_error = 0.1 if len(calls) == 1 else 0.9
    return [{"strategy": st.spec, "cost_units": costs[st], "bias2": 0.0,
             "ca_mse": 0.1 if st.spec == "full" else keep_error,
             "ca_mse_ci": [0.1, 0.1] if st.spec == "full" else [keep_error, keep_error]}
            for st in grad_fns]

  monkeypatch.setattr(grad_error, "measure", fake_measure)
  workdir = str(tmp_path / "run")
  # With a prior, enough batches that a measurement could displace it (5 for one candidate).
  batches = 5 if prior else 2
  train.train_and_evaluate(online_config(20, **{"search.final_full": final_full,
                                                 "search.prior": prior,
                                                 "online.reference_batches": batches,
                                                 "online.batches": batches}), workdir)
  lines = read_lines(workdir)
  choices = [l for l in lines if "online_choice" in l]
  first = "full" if prior else KEEP
  assert [l["online_choice"] for l in choices] == [first, "full"]
  # each decision says why: the measured pick, or the final full-length rule
  assert "lowest CA-MSE" in choices[0]["online_why"]
  assert ("none below the prior's full" in choices[0]["online_why"]) == bool(prior)
  assert ("search.final_full" in choices[1]["online_why"]) == final_full
  with open(os.path.join(workdir, "plan.json")) as f:
    stages = json.load(f)["stages"]
  assert [s["spec"] for s in stages] == [first, "full"]
  # measured at the start of each segment, but for a final full-length one
  assert calls == ([0] if final_full else [0, stages[1]["start_step"]])
  assert (choices[1]["online_overhead_units"] == 0) == final_full
  train_lines = [l for l in lines if "loss" in l]
  assert {l["stage"] for l in train_lines} == {0, 1}
  assert train_lines[-1]["budget_progress"] <= 1.0 + 1e-9


def test_too_few_batches_to_displace_the_prior_measure_nothing_and_run_the_prior(
    tmp_path, monkeypatch, needs_fashion_mnist):
  """2 + 2 batches cannot displace a prior (5 needed for one candidate): no measurement, no
  charge, and each segment runs the prior's strategy at its planned start - the second one full
  length, though the units spent when it starts fall just short of the prior's boundary at 0.5."""
  def never(*args, **kwargs):
    raise AssertionError("measured, though no measurement could change the decision")

  monkeypatch.setattr(grad_error, "measure", never)
  config = online_config(20, **{"search.final_full": False, "search.prior": f"0.5:{KEEP}; 1:full"})
  n = 60000
  assert not step_plan.online_measures(config, n)
  assert step_plan.online_overhead_units(config, n) == 0
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  choices = [l for l in read_lines(workdir) if "online_choice" in l]
  assert [l["online_choice"] for l in choices] == [KEEP, "full"]
  assert all(l["online_overhead_units"] == 0 for l in choices)
  assert "cannot displace it (that takes >= 5 batches each" in choices[0]["online_why"]
  with open(os.path.join(workdir, "plan.json")) as f:
    plan = json.load(f)
  assert plan["stages"][0]["start_units"] == 0   # nothing charged before the first segment
  config.online.reference_batches = config.online.batches = 5
  assert step_plan.online_measures(config, n) and step_plan.online_overhead_units(config, n) > 0


def test_measurements_the_budget_does_not_pay_for_are_not_taken():
  """Enough batches to displace the prior, but their cost above online.measure_fraction of the
  budget: the prior runs unmeasured, at no charge, and says why; with a larger cap (or budget) it
  measures. Without a prior to fall back on, the same shortfall is an error before training."""
  n = 60000
  config = online_config(20, **{"search.prior": f"0.5:{KEEP}; 1:full",
                                "online.reference_batches": 5, "online.batches": 5})
  full_plan = step_plan.make_step_plan(config, n)
  measures, _ = step_plan.online_measurement(config, n)
  assert measures and full_plan.stages[0].start_units > 0
  # the share of the budget one measurement takes: decisions x round / budget
  decisions = len(step_plan.online_segments(config.online.every)) - 1   # final_full: last unmeasured
  share = decisions * step_plan.online_overhead_units(config, n) / step_plan.budget_units(config, n)
  config.online.measure_fraction = share * 0.99
  measures, why = step_plan.online_measurement(config, n)
  assert not measures and f"would cost {share:.1%} of the budget" in why
  assert "online.measure_fraction" in why
  assert step_plan.online_overhead_units(config, n) == 0
  assert step_plan.make_step_plan(config, n).stages[0].start_units == 0
  config.online.measure_fraction = share * 1.01
  assert step_plan.online_measures(config, n)
  # The count of measured decisions: every segment but a final full-length one.
  config.online.every, config.search.final_full = 0.25, False
  round_units = step_plan.measurement_units(config, step_plan.candidates(config, "online.candidates"),
                                            5, 5)
  share = 4 * round_units / step_plan.budget_units(config, n)
  config.online.measure_fraction = share * 1.01
  assert step_plan.online_measures(config, n)
  config.online.measure_fraction = share * 0.99
  assert not step_plan.online_measures(config, n)
  config.search.prior = ""
  with pytest.raises(UserError, match="without search.prior there is nothing to follow"):
    step_plan.make_step_plan(config, n)


@pytest.mark.parametrize("recipe", ["mocov3", "simclr", "dino"])
def test_the_recipes_online_schedule_measures_at_four_epochs_not_at_one(recipe):
  """The defaults' cap: measuring 4 decisions costs ~10% of a 1-epoch budget (more than the
  measurements could win back), a few % of a 4-epoch one; the recipe's prior can be displaced."""
  import importlib
  config = importlib.import_module(f"configs.fmnist_{recipe}").get_config()
  n = 60000
  config.budget, config.budget_epochs = -1.0, 1.0
  assert not step_plan.online_measures(config, n)
  config.budget_epochs = 4.0
  assert step_plan.online_measures(config, n)
  # where it starts: ~10% of a 1-epoch budget for four rounds, so from ~2.1 epochs (DINO's two
  # candidates: 2)
  config.budget_epochs = 1.9
  assert not step_plan.online_measures(config, n)
  config.budget_epochs = 2.2
  assert step_plan.online_measures(config, n)
  assert step_plan.prior_displaceable(config, "online.candidates", config.online.reference_batches,
                                      config.online.batches)[0]


@pytest.mark.slow
def test_online_run_resumes_exactly(tmp_path, needs_fashion_mnist):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  train.train_and_evaluate(online_config(10), straight)
  decided = [l for l in read_lines(straight) if "online_choice" in l]
  assert len(decided) == 2
  second = decided[1]["step"]
  train.train_and_evaluate(online_config(10, stop_at_step=second - 1), stopped)
  train.train_and_evaluate(online_config(10), stopped)
  assert [l["online_choice"] for l in read_lines(stopped) if "online_choice" in l] == \
      [l["online_choice"] for l in decided]
  with open(os.path.join(straight, "plan.json")) as a, open(os.path.join(stopped, "plan.json")) as b:
    assert json.load(a) == json.load(b)
  last = json.load(open(os.path.join(straight, "plan.json")))["total_steps"]
  import orbax.checkpoint as ocp
  pa = ocp.StandardCheckpointer().restore(os.path.join(straight, "checkpoints", str(last), "state"))
  pb = ocp.StandardCheckpointer().restore(os.path.join(stopped, "checkpoints", str(last), "state"))
  jax.tree.map(np.testing.assert_array_equal, pa["params"], pb["params"])


def test_a_prior_the_online_schedule_cannot_weigh_is_an_error_before_anything_runs():
  from vit_accel import config_checks
  from vit_accel.errors import UserError
  config_checks.validate_config(online_config(10, **{"search.prior": "1:" + KEEP}))
  with pytest.raises(UserError, match=r"search.prior='dynamic' runs .*keep0.5\|keep0.5.*"
                                      r"online.candidates does not measure"):
    config_checks.validate_config(online_config(10, **{"search.prior": "dynamic"}))
  with pytest.raises(UserError, match="search.prior='0.5:keep0.25': stage ends"):
    config_checks.validate_config(online_config(10, **{"search.prior": "0.5:keep0.25"}))
  # A fixed schedule does not measure: its prior is only parsed.
  config_checks.validate_config(tiny_config(**{"search.prior": "dynamic"}))


def test_online_segments():
  assert step_plan.online_segments(0.25) == [0.25, 0.5, 0.75, 1.0]
  assert step_plan.online_segments(1.0) == [1.0]
  with pytest.raises(Exception, match="online.every"):
    step_plan.online_segments(0.0)
