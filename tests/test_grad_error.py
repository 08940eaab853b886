"""Gradient-error estimators on a problem with closed-form bias and variance; --mode=grad_error,
--mode=search and --mode=pilot end to end."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from vit_accel import grad_error, schedule_search, step_plan
from vit_accel.errors import UserError
from vit_accel.modes import grad_error as grad_error_mode
from vit_accel.modes import pilot as pilot_mode
from vit_accel.modes import search as search_mode

MODEL = ml_collections.ConfigDict(dict(width=128, depth=4, mlp_ratio=4.0, patch_size=4,
                                       image_size=32))
D, B, SIGMA = 6, 8, 0.5
DROPPED = [4, 5]   # the "compressed" gradient never sees these features


def least_squares_problem(seed=0):
  """rng, w (current parameters), w* (truth): the dropped features carry a clear share of the
  gradient, so the bias is a sizeable fraction of ||g*||^2."""
  rng = np.random.default_rng(seed)
  w_star = rng.normal(size=D)
  w = w_star + np.array([0.5, -0.5, 0.5, -0.5, 1.0, -1.0])
  return rng, w, w_star


def batch_gradient(rng, w, w_star, mask):
  """Gradient of 1/2 mean (x_m . w - y)^2 over a batch, x ~ N(0, I), y = x . w* + noise, where the
  model sees the masked features x_m = x * mask."""
  x = rng.normal(size=(B, D))
  y = x @ w_star + SIGMA * rng.normal(size=B)
  xm = x * mask
  return xm.T @ (xm @ w - y) / B


def closed_form(w, w_star, mask):
  """(mean gradient, total variance of a batch gradient) for x ~ N(0, I) (Isserlis)."""
  d_eff = w * mask - w_star                      # residual direction the model really has
  mean = np.where(mask > 0, w - w_star, 0.0)
  per_coord = (d_eff @ d_eff + d_eff ** 2 + SIGMA ** 2) / B
  return mean, float(np.sum(per_coord * mask))


def gradients_of(rng, w, w_star, mask, n):
  return np.stack([batch_gradient(rng, w, w_star, mask) for _ in range(n)])


def estimate(ref, cand, cost_ratio, draws=0, seed=0):
  """gram_terms on uniform weights (row 0) and `draws` bootstrap draws; cand=None: the reference."""
  gen = np.random.default_rng(seed)
  w = grad_error.bootstrap_weights(gen, len(ref), draws)
  rr = ref @ ref.T
  if cand is None:
    return grad_error.gram_terms(rr, rr, rr, w, w, cost_ratio)
  v = grad_error.bootstrap_weights(gen, len(cand), draws)
  return grad_error.gram_terms(rr, cand @ cand.T, cand @ ref.T, w, v, cost_ratio)


def test_estimators_recover_closed_form_bias_and_variance():
  rng, w, w_star = least_squares_problem()
  full, drop = np.ones(D), np.ones(D)
  drop[DROPPED] = 0.0
  ref = gradients_of(rng, w, w_star, full, 3000)
  cand = gradients_of(rng, w, w_star, drop, 3000)
  row = {k: v[0] for k, v in estimate(ref, cand, 0.5).items()}

  g_star, _ = closed_form(w, w_star, full)
  mean, variance = closed_form(w, w_star, drop)
  norm2 = g_star @ g_star
  assert row["grad_norm2"] == pytest.approx(norm2, rel=0.05)
  assert row["bias2"] == pytest.approx(np.sum((mean - g_star) ** 2) / norm2, rel=0.05)
  assert row["variance"] == pytest.approx(variance / norm2, rel=0.05)
  assert row["ca_mse"] == pytest.approx(row["bias2"] + 0.5 * row["variance"], rel=1e-12)
  expected_cos = mean @ g_star / np.linalg.norm(mean) / np.sqrt(norm2)
  assert row["cosine"] == pytest.approx(expected_cos, abs=0.01)
  # The reference's own row: no bias, the reference batches' variance.
  _, full_variance = closed_form(w, w_star, full)
  own = {k: v[0] for k, v in estimate(ref, None, 1.0).items()}
  assert own["bias2"] == 0 and own["variance"] * norm2 == pytest.approx(full_variance, rel=0.05)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_adam_scale_is_adamw_denominator_after_its_steps(grad_clip):
  """adam_scale = 1 / (sqrt(nu / (1 - b2^t)) + 1e-8), nu AdamW's second moment after t steps,
  recomputed here from the gradients fed (clipped or not: the optimiser is a chain then); before
  any step every coordinate gets the same factor (the Euclidean metric)."""
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree

  from vit_accel import optimizer
  config = ml_collections.ConfigDict({"optim": dict(b1=0.9, b2=0.95, weight_decay=0.1,
                                                    grad_clip=grad_clip)})
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, "scale": jnp.ones(4)}
  tx = optimizer.make_optimizer(config)
  opt_state = tx.init(params)
  first = grad_error.adam_scale(config, opt_state, None)
  assert first.shape == (12,) and np.all(first == first[0])
  rng = np.random.default_rng(0)
  nu = np.zeros(12)
  for t in range(1, 4):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3.0, jnp.float32),
                         params)
    flat = np.asarray(ravel_pytree(grads)[0], np.float64)
    if grad_clip:   # clip_by_global_norm runs before AdamW's moments
      flat = flat * min(1.0, grad_clip / np.linalg.norm(flat))
    nu = 0.95 * nu + 0.05 * flat ** 2
    _, opt_state = tx.update(grads, opt_state, params)
  expected = 1.0 / (np.sqrt(nu / (1 - 0.95 ** 3)) + 1e-8)
  np.testing.assert_allclose(grad_error.adam_scale(config, opt_state, None), expected, rtol=1e-4)


def test_adam_scale_refuses_an_optimiser_without_adams_moments():
  import jax.numpy as jnp
  import optax
  config = ml_collections.ConfigDict({"optim": dict(b2=0.95)})
  opt_state = optax.sgd(0.1, momentum=0.9).init({"w": jnp.ones(3)})
  with pytest.raises(UserError, match="grad_error.metric=adam needs the state of one AdamW"):
    grad_error.adam_scale(config, opt_state, None)
  two = optax.chain(optax.adam(0.1), optax.adam(0.1)).init({"w": jnp.ones(3)})
  with pytest.raises(UserError, match="needs the state of one AdamW"):
    grad_error.adam_scale(config, two, None)


def test_adam_scale_skips_coordinates_without_a_gradient_yet_and_other_counts():
  """A leaf whose gradients were all 0 (a frozen layer: AdamW leaves it alone) gets factor 0, not
  1 / eps; a schedule's own step count elsewhere in the chain is not taken for AdamW's."""
  import jax.numpy as jnp
  import optax
  config = ml_collections.ConfigDict({"optim": dict(b2=0.95)})
  params = {"frozen": jnp.ones(2), "live": jnp.ones(3)}
  tx = optax.chain(optax.scale_by_schedule(lambda count: 1.0), optax.adam(1.0, b2=0.95))
  opt_state = tx.init(params)
  grads = {"frozen": jnp.zeros(2), "live": jnp.array([1.0, 2.0, -4.0])}
  for _ in range(2):
    _, opt_state = tx.update(grads, opt_state, params)
  got = grad_error.adam_scale(config, opt_state, None)
  # ravel order: "frozen" then "live"; nu_hat = g^2 exactly for a constant gradient
  np.testing.assert_allclose(got, [0.0, 0.0, 1.0, 0.5, 0.25], rtol=1e-5)


def test_gram_terms_equal_the_direct_formulas():
  gen = np.random.default_rng(3)
  ref = gen.normal(size=(7, 40)) + 1.0
  cand = gen.normal(size=(5, 40)) * 2 + 0.5
  row = {k: v[0] for k, v in estimate(ref, cand, 0.25).items()}
  g_star, g = ref.mean(0), cand.mean(0)
  norm2 = g_star @ g_star
  var, var_ref = np.sum(cand.var(0, ddof=1)), np.sum(ref.var(0, ddof=1))
  plugin = np.sum((g - g_star) ** 2)
  assert row["bias2_plugin"] == pytest.approx(plugin / norm2, rel=1e-10)
  assert row["bias2"] == pytest.approx(max(plugin - var / 5 - var_ref / 7, 0) / norm2, rel=1e-10)
  assert row["variance"] == pytest.approx(var / norm2, rel=1e-10)
  assert row["cosine"] == pytest.approx(g @ g_star / np.linalg.norm(g) / np.sqrt(norm2), rel=1e-10)
  # A bootstrap draw is the same formula on the resampled batches.
  gen_w = np.random.default_rng(9)
  w = grad_error.bootstrap_weights(gen_w, 7, 1)[1:]
  v = grad_error.bootstrap_weights(gen_w, 5, 1)[1:]
  draw = grad_error.gram_terms(ref @ ref.T, cand @ cand.T, cand @ ref.T, w, v, 0.25)
  ref_b = np.repeat(ref, np.round(w[0] * 7).astype(int), axis=0)
  cand_b = np.repeat(cand, np.round(v[0] * 5).astype(int), axis=0)
  plugin_b = np.sum((cand_b.mean(0) - ref_b.mean(0)) ** 2)
  assert draw["bias2_plugin"][0] == pytest.approx(plugin_b / (ref_b.mean(0) @ ref_b.mean(0)),
                                                  rel=1e-10)


def test_unbiased_strategy_has_near_zero_bias_after_noise_correction():
  """Few batches: the plug-in squared bias of an *unbiased* estimate is pure estimator noise
  (~var/M + var/R); the corrected value removes it."""
  rng, w, w_star = least_squares_problem(1)
  full = np.ones(D)
  plugin, corrected = [], []
  for _ in range(200):
    row = estimate(gradients_of(rng, w, w_star, full, 10), gradients_of(rng, w, w_star, full, 10),
                   1.0)
    plugin.append(row["bias2_plugin"][0])
    corrected.append(row["bias2"][0])
  _, variance = closed_form(w, w_star, full)
  g_star, _ = closed_form(w, w_star, full)
  assert np.mean(plugin) == pytest.approx(2 * variance / 10 / (g_star @ g_star), rel=0.25)
  assert np.mean(corrected) < 0.25 * np.mean(plugin)


def test_bootstrap_intervals_cover_the_truth_and_shrink_with_rounds():
  """90% intervals of CA-MSE cover the closed-form value in most repetitions (the bootstrap is
  approximate at 16 batches), and pooling 4 rounds narrows them about 2x."""
  rng, w, w_star = least_squares_problem(2)
  full, drop = np.ones(D), np.ones(D)
  drop[DROPPED] = 0.0
  g_star, _ = closed_form(w, w_star, full)
  mean, variance = closed_form(w, w_star, drop)
  truth = (np.sum((mean - g_star) ** 2) + 0.5 * variance) / (g_star @ g_star)

  def one_round(seed):
    terms = estimate(gradients_of(rng, w, w_star, full, 16),
                     gradients_of(rng, w, w_star, drop, 16), 0.5, draws=300, seed=seed)
    return {"cand": terms, "_rows": [{"strategy": "cand"}], "_batches": {"cand": 16}}

  covered, widths = 0, {1: [], 4: []}
  for i in range(60):
    rounds = [one_round(4 * i + j) for j in range(4)]
    for n in (1, 4):
      row = grad_error.pool_rounds(rounds[:n], 0.9)[0]
      low, high = row["ca_mse_ci"]
      assert low <= row["ca_mse"] <= high
      widths[n].append(high - low)
      if n == 1:
        covered += low <= truth <= high
    assert row["rounds"] == 4 and row["num_batches"] == 64
  assert 0.7 <= covered / 60 <= 1.0
  assert np.mean(widths[4]) < 0.7 * np.mean(widths[1])


def test_intervals_centre_on_the_estimates_for_high_dimensional_gradients():
  """Few batches of many-coordinate gradients (as a network's are): a resample's variance is
  (n - 1) / n of the sample's and its mean's norm is inflated, shifts far larger than the draws'
  spread. Bias-corrected, every interval holds its own estimate, an unbiased candidate's bias2
  interval reaches 0 and the variance interval covers the true value; the raw percentile
  intervals do none of these."""
  rng = np.random.default_rng(5)
  p, r, m, repeats = 400, 8, 6, 60
  g = rng.normal(size=p)
  g /= np.linalg.norm(g)
  true_var = 2.0                                 # E ||g_batch - g||^2, with ||g|| = 1
  sigma = np.sqrt(true_var / p)
  truth = true_var / (1.0 + true_var / r)        # normalised by E ||mean of R batches||^2
  inside = reaches_zero = covers = 0
  for i in range(repeats):
    ref = g + sigma * rng.normal(size=(r, p))
    cand = g + sigma * rng.normal(size=(m, p))   # unbiased: the same mean gradient
    terms = estimate(ref, cand, 0.5, draws=200, seed=i)
    row = grad_error.pool_rounds([{"c": terms, "_rows": [{"strategy": "c"}],
                                   "_batches": {"c": m}}], 0.9)[0]
    inside += all(row[f"{t}_ci"][0] <= row[t] <= row[f"{t}_ci"][1] for t in grad_error.TERMS)
    reaches_zero += row["bias2_ci"][0] <= 0.0
    covers += row["variance_ci"][0] <= truth <= row["variance_ci"][1]
  assert inside == repeats
  assert reaches_zero >= 0.9 * repeats
  assert covers >= 0.8 * repeats
  # The shift itself: draws moved by mean(draws) - estimate, the estimate kept.
  values = np.array([1.0, 0.5, 0.7, 0.6])
  np.testing.assert_allclose(grad_error.bias_corrected(values), [1.0, 0.9, 1.1, 1.0])


def test_resolved_when_clear_or_precise_enough():
  def r(name, ca, low, high, diff_low):
    return {"strategy": name, "ca_mse": ca, "ca_mse_ci": [low, high],
            "ca_mse_diff_ci": {"a": [diff_low, 1.0], "b": [-1.0, 1.0]}}
  # b is higher than a with confidence (paired difference > 0), though the intervals overlap
  assert grad_error.resolved([r("a", 0.1, 0.05, 0.16, 0), r("b", 0.2, 0.15, 0.25, 0.01)], 0.1)
  # the paired difference still reaches 0 and a's interval is wide: measure again
  assert not grad_error.resolved([r("a", 0.1, 0.05, 0.16, 0), r("b", 0.2, 0.15, 0.25, -0.02)],
                                 0.1)
  # unresolved, but a is measured to 10%: a tie at that precision
  assert grad_error.resolved([r("a", 0.1, 0.096, 0.104, 0), r("b", 0.102, 0.1, 0.11, -0.01)], 0.1)


def test_pooling_averages_bias_before_clipping_and_pairs_the_differences():
  """An unbiased strategy's clipped bias2 is > 0 on average; pooled unclipped it tends to 0. The
  paired difference of two strategies measured on the same batches is far tighter than their
  separate intervals."""
  rng, w, w_star = least_squares_problem(4)
  full = np.ones(D)
  rounds = []
  for i in range(16):
    ref = gradients_of(rng, w, w_star, full, 4)
    same = gradients_of(rng, w, w_star, full, 4)
    noisy = same + 0.01 * rng.normal(size=same.shape)     # the same batches, slightly perturbed
    gen = np.random.default_rng(i)
    wts, v = (grad_error.bootstrap_weights(gen, 4, 200) for _ in range(2))
    rr = ref @ ref.T
    rounds.append({"same": grad_error.gram_terms(rr, same @ same.T, same @ ref.T, wts, v, 1.0),
                   "noisy": grad_error.gram_terms(rr, noisy @ noisy.T, noisy @ ref.T, wts, v, 1.0),
                   "_rows": [{"strategy": "same"}, {"strategy": "noisy"}],
                   "_batches": {"same": 4, "noisy": 4}})
  clipped_mean = np.mean([rnd["same"]["bias2"][0] for rnd in rounds])
  pooled = {r["strategy"]: r for r in grad_error.pool_rounds(rounds, 0.9)}
  assert pooled["same"]["bias2"] < 0.5 * clipped_mean
  low, high = pooled["noisy"]["ca_mse_diff_ci"]["same"]
  separate = pooled["same"]["ca_mse_ci"][1] - pooled["same"]["ca_mse_ci"][0]
  assert low <= 0 <= high + 1e-12 and (high - low) < 0.2 * separate


def row(strategy, ca_mse, cost):
  return {"strategy": strategy, "ca_mse": ca_mse, "cost_units": cost}


def test_search_mode_writes_a_schedule_file_training_reads(tmp_path):
  from conftest import tiny_config
  tables = [{"progress": 0.2, "rows": [row("full", 0.5, 8.0), row("keep0.25|keep0.25", 0.1, 2.0)]},
            {"progress": 0.8, "rows": [row("full", 0.1, 8.0), row("keep0.25|keep0.25", 0.3, 2.0)]}]
  (tmp_path / "grad_error.json").write_text(json.dumps({"tables": tables}))
  config = tiny_config(**{"search.prior": "dynamic"})
  # The recipe's prior runs strategies these tables did not measure: one error line, no file.
  with pytest.raises(UserError, match=r"search.prior's strategy 'patch8\|patch8' was not "
                                      r"measured .* set search.prior=''"):
    search_mode.run(config, str(tmp_path))
  assert not (tmp_path / "schedule.txt").exists()
  config.search.prior = ""
  text = search_mode.run(config, str(tmp_path))
  assert text == "0.5:keep0.25|keep0.25; 1:full"
  config.schedule_file = str(tmp_path / "schedule.txt")
  stages = step_plan.schedule_stages(config)
  assert [(s.end, s.strategies.spec) for s in stages] == [(0.5, "keep0.25|keep0.25"), (1.0, "full")]
  config.schedule_file = str(tmp_path / "nope.txt")
  with pytest.raises(UserError, match="cannot be read"):
    step_plan.schedule_stages(config)
  os.remove(tmp_path / "grad_error.json")
  with pytest.raises(UserError, match="run --mode=grad_error"):
    search_mode.run(config, str(tmp_path))



def test_grad_error_then_search_on_a_tiny_run(tmp_path, needs_fashion_mnist):
  """--mode=grad_error on a run's milestone and final checkpoints, then --mode=search, then its
  schedule is accepted by training's config."""
  from conftest import tiny_config
  from vit_accel import train
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"checkpoint.at_progress": (0.3,), "checkpoint.every_steps": 100})
  train.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "milestones")) == ["2"]  # 2 / 6.5 steps >= 30%

  config.grad_error.reference_batches = 2
  config.grad_error.batches = 3
  config.grad_error.candidates = ("keep0.25|keep0.25",)
  saved = grad_error_mode.saved_steps(workdir)
  assert {s: os.path.basename(d) for s, d in saved.items()} == {2: "milestones", 6: "checkpoints"}
  config.grad_error.steps = (2, 6)  # by default only the milestones (when a run kept some)
  result = grad_error_mode.run(config, workdir)
  assert [t["step"] for t in result["tables"]] == [2, 6]
  for table in result["tables"]:
    full, keep = table["rows"]
    assert (full["strategy"], keep["strategy"]) == ("full", "keep0.25|keep0.25")
    assert keep["cost_units"] < full["cost_units"]
    assert (full["num_batches"], keep["num_batches"]) == (2 * full["rounds"], 3 * full["rounds"])
    assert 1 <= full["rounds"] <= config.grad_error.max_rounds
    assert full["bias2"] == 0 and full["cosine"] == pytest.approx(1.0)
    for r in (full, keep):
      assert np.isfinite(r["ca_mse"]) and r["variance"] > 0
      assert 0 <= r["bias2"] <= r["bias2_plugin"]
      assert r["ca_mse_ci"][0] <= r["ca_mse"] <= r["ca_mse_ci"][1]
  saved = json.loads((tmp_path / "run" / "grad_error.json").read_text())
  assert saved["tables"][1]["rows"][1]["ca_mse"] == result["tables"][1]["rows"][1]["ca_mse"]
  assert saved["metric"] == "euclidean"
  assert (tmp_path / "run" / "grad_error.png").stat().st_size > 0

  config.search.prior = "1:keep0.25|keep0.25"   # one the measured candidates can weigh
  text = search_mode.run(config, workdir)
  config.schedule_file = os.path.join(workdir, "schedule.txt")
  assert [s.strategies.spec for s in step_plan.schedule_stages(config)] == [
      p.split(":")[1] for p in text.split("; ")]
  step_plan.make_step_plan(config, 60000)  # the plan is a valid step plan for this model and budget
  plan = json.loads((tmp_path / "run" / "schedule.json").read_text())
  assert plan["schedule"] == text and plan["settings"]["ties"] == "interval"
  assert plan["settings"]["prior"] == "1:keep0.25|keep0.25"
  assert all(line.startswith("at ") for s in plan["stages"] for line in s["why"])

  config.grad_error.steps = (4,)
  with pytest.raises(UserError, match=r"grad_error.steps \[4\] not saved"):
    grad_error_mode.run(config, workdir)

  # The same batches in AdamW's preconditioned coordinates: other values, same kind of table.
  adam = grad_error_mode.run(ml_collections.ConfigDict(
      {**config.to_dict(), "schedule_file": "",
       "grad_error": {**config.grad_error.to_dict(), "metric": "adam", "steps": (6,)}}), workdir)
  assert adam["metric"] == "adam"
  full, keep = adam["tables"][0]["rows"]
  euclid = result["tables"][1]["rows"]
  assert full["grad_norm2"] != pytest.approx(euclid[0]["grad_norm2"], rel=1e-2)
  assert keep["ca_mse"] != pytest.approx(euclid[1]["ca_mse"], rel=1e-3)
  assert np.isfinite(keep["ca_mse"]) and keep["variance"] > 0 and full["bias2"] == 0


def test_pilot_runs_measures_and_searches_in_one_call(tmp_path, needs_fashion_mnist):
  from conftest import tiny_config
  config = tiny_config(**{"pilot.budget_fraction": 1.0, "pilot.at_progress": (0.3, 0.9),
                          "pilot.measure_fraction": 1.0,
                          "grad_error.reference_batches": 2, "grad_error.batches": 2,
                          # at a one-sided 25% level 2 batches can displace the prior
                          "grad_error.ci_level": 0.5,
                          "grad_error.candidates": ("keep0.25|keep0.25",),
                          "search.prior": "1:keep0.25|keep0.25", "pilot.warm_start": True})
  text = pilot_mode.run(config, str(tmp_path))
  pilot_dir = tmp_path / "pilot"
  assert sorted(os.listdir(pilot_dir / "milestones")) == ["2", "6"]  # 30% -> step 2, 90% -> 6
  measured = json.loads((pilot_dir / "grad_error.json").read_text())
  assert [t["step"] for t in measured["tables"]] == [2, 6]
  assert text in (tmp_path / "schedule.txt").read_text()
  config.schedule_file = str(tmp_path / "schedule.txt")
  step_plan.make_step_plan(config, 60000)
  # What the pilot spent: its training budget plus every measurement round, charged.
  cost = json.loads((tmp_path / "pilot_cost.json").read_text())
  budget = step_plan.budget_units(config, 60000)
  assert cost["train_units"] == pytest.approx(budget)           # budget_fraction 1.0 here
  rounds = sum(t["rows"][0]["rounds"] for t in measured["tables"])
  assert cost["rounds"] == rounds >= 2 and cost["measured"]
  per_round = step_plan.measurement_units(config, step_plan.candidates(
      config, "grad_error.candidates"), 2, 2)
  assert per_round > 0 and cost["measurement_units"] == pytest.approx(rounds * per_round)
  assert cost["remaining_units"] == pytest.approx(budget - cost["total_units"])
  assert "nothing is left" in (tmp_path / "schedule.txt").read_text()   # fraction 1.0 here
  # pilot.warm_start: the searched run is to start from the pilot's final weights.
  assert cost["warm_start"] and cost["init_workdir"] == str(pilot_dir)
  assert pilot_mode.searched_run_flags(dict(cost, remaining_units=1500.0)) == (
      f"--config.budget=1500 --config.init.workdir={pilot_dir}")
  assert pilot_mode.searched_run_flags(
      dict(cost, remaining_units=2.5e6, init_workdir="/runs/my run/pilot")) == (
      "--config.budget=2.5e+06 --config.init.workdir='/runs/my run/pilot'")   # a shell word
  assert pilot_mode.searched_run_flags(dict(cost, init_workdir=None)).count("--config") == 1


@pytest.mark.slow
def test_a_pilot_under_the_prior_trains_its_stages_and_an_empty_prior_is_refused(
    tmp_path, needs_fashion_mnist):
  """pilot.train_schedule=prior: the pilot's step plan is search.prior's (compressed in time), so
  the milestone weights are trained as the run would train them; without a prior, one line and
  nothing is written."""
  from conftest import tiny_config
  overrides = {"pilot.budget_fraction": 1.0, "pilot.at_progress": (0.3, 0.9),
               "pilot.measure_fraction": 1.0, "pilot.train_schedule": "prior",
               "grad_error.reference_batches": 2, "grad_error.batches": 2,
               "grad_error.ci_level": 0.5, "grad_error.candidates": ("keep0.25|keep0.25",)}
  config = tiny_config(**overrides, **{"search.prior": "0.5:keep0.25|keep0.25; 1:full"})
  pilot_mode.run(config, str(tmp_path / "a"))
  plan = json.loads((tmp_path / "a" / "pilot" / "plan.json").read_text())
  assert [s["spec"] for s in plan["stages"]] == ["keep0.25|keep0.25", "full"]
  cost = json.loads((tmp_path / "a" / "pilot_cost.json").read_text())
  assert cost["train_units"] == pytest.approx(step_plan.budget_units(config, 60000))
  assert cost["measured"]
  unprimed = tiny_config(**overrides, **{"search.prior": ""})
  with pytest.raises(UserError, match="pilot.train_schedule=prior trains the pilot under "
                                      "search.prior, which is empty"):
    pilot_mode.run(unprimed, str(tmp_path / "b"))
  assert not (tmp_path / "b").exists()


def test_pilot_measurements_fit_their_share_of_the_budget(tmp_path, needs_fashion_mnist):
  """measurement_plan: the configured R, M and rounds where the cap allows; R and M shrunk together
  (not below 2) and fewer rounds at smaller budgets, one round per milestone always within the
  cap; a budget that cannot pay for R = M = 2 is one UserError before the pilot trains."""
  from conftest import tiny_config
  config = tiny_config(**{"grad_error.reference_batches": 8, "grad_error.batches": 6,
                          "grad_error.max_rounds": 3, "pilot.measure_fraction": 0.1,
                          "pilot.at_progress": (0.2, 0.5, 0.8)})
  strategies = step_plan.candidates(config, "grad_error.candidates")
  units = lambda r, m: step_plan.measurement_units(config, strategies, r, m)  # noqa: E731
  for budget, expected in ((1e3 * 30 * units(8, 6), (8, 6, 3)),   # plenty: as configured
                           (30 * units(8, 6) * 2.5, (8, 6, 2)),   # two full rounds per milestone
                           (30 * units(4, 3) * 1.01, (4, 3, 1)),  # half the batches, one round
                           (30 * units(2, 2) * 1.001, (2, 2, 1))):  # the floor
    config.budget = budget
    plan = pilot_mode.measurement_plan(config, 60000)
    assert (plan["reference_batches"], plan["batches"], plan["max_rounds"]) == expected
    assert plan["round_units"] == pytest.approx(units(*expected[:2]))
    assert 3 * plan["max_rounds"] * plan["round_units"] <= 0.1 * budget * (1 + 1e-9)
  # Uneven R:M: scaled together one of them falls below 2; held at 2, the other takes the rest.
  config.grad_error.reference_batches, config.grad_error.batches = 16, 4
  config.budget = 30 * units(2, 2) * 1.3
  plan = pilot_mode.measurement_plan(config, 60000)
  assert min(plan["reference_batches"], plan["batches"]) >= 2
  assert 3 * plan["round_units"] <= 0.1 * config.budget * (1 + 1e-9)
  config.budget = 30 * units(2, 2) * 0.9
  config.search.prior = ""   # with a prior, such a budget runs the prior unmeasured instead
  with pytest.raises(UserError, match=r"pilot.measure_fraction=0.1 .* cannot pay for one "
                                      r"gradient-error round"):
    pilot_mode.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "pilot")   # nothing trained
  # A prior the pilot would not measure fails before the pilot trains, too.
  config.budget = 1e3 * 30 * units(8, 6)
  config.search.prior = "1:keep0.75|keep0.75"
  with pytest.raises(UserError, match=r"keep0.75\|keep0.75, which grad_error.candidates does "
                                      r"not measure"):
    pilot_mode.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "pilot")


def test_a_pilot_that_could_not_displace_the_prior_trains_and_measures_nothing(
    tmp_path, needs_fashion_mnist):
  """At a budget whose affordable measurements (here R = 4, M = 3, one round) are fewer than the
  7 batches that could displace the prior against five candidates, the pilot spends nothing and
  the schedule is the prior; at a budget that affords them, it measures."""
  from conftest import tiny_config
  config = tiny_config(**{"grad_error.reference_batches": 8, "grad_error.batches": 6,
                          "grad_error.max_rounds": 1, "pilot.measure_fraction": 0.1,
                          "pilot.at_progress": (0.2, 0.5, 0.8), "search.prior": "dynamic"})
  strategies = step_plan.candidates(config, "grad_error.candidates")
  assert len(strategies) == 6
  units = lambda r, m: step_plan.measurement_units(config, strategies, r, m)  # noqa: E731
  config.budget = 30 * units(4, 3) * 1.01
  assert step_plan.prior_displaceable(config, "grad_error.candidates", 4, 3) == (False, 7)
  text = pilot_mode.run(config, str(tmp_path))
  assert text == "dynamic" and not os.path.exists(tmp_path / "pilot")
  cost = json.loads((tmp_path / "pilot_cost.json").read_text())
  assert cost["total_units"] == 0 and cost["remaining_units"] == pytest.approx(config.budget)
  assert not cost["measured"] and cost["needed_batches"] == 7
  assert cost["init_workdir"] is None   # no pilot trained, nothing to start from
  schedule = (tmp_path / "schedule.txt").read_text()
  assert "displacing the prior takes >= 7 of each" in schedule
  config.schedule_file = str(tmp_path / "schedule.txt")
  planned = step_plan.make_step_plan(config, 60000)
  config.schedule_file, config.schedule = "", "dynamic"
  assert planned == step_plan.make_step_plan(config, 60000)
  # Eight batches each in one round would do; without a prior nothing needs displacing.
  assert step_plan.prior_displaceable(config, "grad_error.candidates", 8, 8) == (True, 7)
  assert step_plan.prior_displaceable(config, "grad_error.candidates", 4, 4, rounds=2)[0]
  # Against compressed prior stages candidates rest on M alone; against full length on R too.
  assert step_plan.prior_displaceable(config, "grad_error.candidates", 3, 8)[0]
  config.search.prior = "none"
  assert not step_plan.prior_displaceable(config, "grad_error.candidates", 3, 8)[0]
  # A prior that ends compressed gets the final full interval a search would give it.
  config.search.prior = "0.5:patch8|patch8; 1:keep0.5|keep0.5"
  assert pilot_mode.prior_without_pilot(config, str(tmp_path / "ends"), 60000,
                                        {"reference_batches": 0, "batches": 0, "max_rounds": 0},
                                        7) == "0.5:patch8|patch8; 0.65:keep0.5|keep0.5; 1:full"
  # A budget that cannot pay for any measurement: with a prior, the prior (not an error).
  config.search.prior, config.budget = "dynamic", 30 * units(2, 2) * 0.9
  assert pilot_mode.run(config, str(tmp_path / "tiny")) == "dynamic"
  config.search.prior = ""
  assert step_plan.prior_displaceable(config, "grad_error.candidates", 2, 2) == (True, 0)


def test_measured_step_times_replace_the_cost_model_only_when_complete(tmp_path):
  from conftest import tiny_config
  config = tiny_config(**{"grad_error.candidates": ("keep0.25|keep0.25", "patch8|patch8")})
  strategies = step_plan.candidates(config, "grad_error.candidates")
  assert grad_error_mode.measured_cost_ratios(config, str(tmp_path), strategies) is None  # none
  table = [{"strategy": "full", "ms_per_step": 100.0},
           {"strategy": "keep0.25|keep0.25", "ms_per_step": 40.0},
           {"strategy": "patch8|patch8", "ms_per_step": 50.0}]
  (tmp_path / "cost_table.json").write_text(json.dumps(table))
  ratios = grad_error_mode.measured_cost_ratios(config, str(tmp_path), strategies)
  assert [ratios[st] for st in strategies] == [1.0, 0.4, 0.5]
  config.grad_error.cost_table = "none"
  assert grad_error_mode.measured_cost_ratios(config, str(tmp_path), strategies) is None
  config.grad_error.cost_table = ""
  (tmp_path / "cost_table.json").write_text(json.dumps(table[:2]))   # lacks a candidate
  assert grad_error_mode.measured_cost_ratios(config, str(tmp_path), strategies) is None
  config.grad_error.cost_table = str(tmp_path / "missing.json")
  with pytest.raises(UserError, match="not a readable --mode=cost table"):
    grad_error_mode.measured_cost_ratios(config, str(tmp_path), strategies)


def test_noise_alone_rarely_displaces_a_prior():
  """Six strategies with the same CA-MSE (the same batches, each with its own compression noise),
  the first the prior's: five percentile-bootstrap intervals at the 5% one-sided level put some
  challenger below the prior far more often than 5%, and at 4 batches no test can say so at that
  level; with the level shared among the challengers and enough batches the prior is displaced at
  about the level asked for, and at 4 batches never."""
  rng, w, w_star = least_squares_problem(6)
  full = np.ones(D)
  names = ("a", "b", "c", "d", "e", "f")

  def table(n, seed):
    ref, base = gradients_of(rng, w, w_star, full, n), gradients_of(rng, w, w_star, full, n)
    gen = np.random.default_rng(seed)
    wts, v = (grad_error.bootstrap_weights(gen, n, 400) for _ in range(2))
    rr = ref @ ref.T
    rnd = {"_rows": [], "_batches": {}}
    for name in names:
      g = base + 0.3 * rng.normal(size=base.shape)
      rnd[name] = grad_error.gram_terms(rr, g @ g.T, g @ ref.T, wts, v, 0.5)
      rnd["_rows"].append({"strategy": name, "cost_units": 1.0})
      rnd["_batches"][name] = n
    return grad_error.pool_rounds([rnd], 0.9)

  def displaced(rows, guarded):
    if not guarded:   # the interval rule alone, without batch counts and p-values
      rows = [{k: v for k, v in r.items() if k not in ("num_batches", "ca_mse_diff_p")}
              for r in rows]
    return schedule_search.pick(rows, 0.0, prior="a", ci_level=0.9)["strategy"] != "a"

  trials = 200
  small = [table(4, i) for i in range(trials)]
  assert np.mean([displaced(rows, False) for rows in small]) > 0.1   # 5 tests at 5% each
  assert np.mean([displaced(rows, True) for rows in small]) == 0.0
  assert np.mean([displaced(table(8, trials + i), True) for i in range(trials)]) <= 0.06


def test_a_measurement_with_a_prior_settles_once_a_challenger_has_the_batches_to_displace_it():
  def r(name, ca, n, diff_low):
    return {"strategy": name, "ca_mse": ca, "ca_mse_ci": [ca * 0.9, ca * 1.1], "num_batches": n,
            "ca_mse_diff_ci": {o: [diff_low, 1.0] for o in ("a", "b")}}
  # b is clearly the lowest after 6 batches: resolved, and enough without a prior
  rows = [r("a", 0.3, 6, 0.01), r("b", 0.1, 6, -1.0)]
  assert grad_error.settled(rows, 0.1)
  # the prior a needs 7 to be displaced: measure on; at 12 (two rounds) it may stop
  assert not grad_error.settled(rows, 0.1, prior="a", min_batches=7)
  assert grad_error.settled([dict(x, num_batches=12) for x in rows], 0.1, prior="a",
                            min_batches=7)
  # the prior itself lowest, or a prior this table does not have: nothing more to learn
  assert grad_error.settled(rows, 0.1, prior="b", min_batches=7)
  assert grad_error.settled(rows, 0.1, prior="c", min_batches=7)
  # unresolved stays unresolved
  rows[0]["ca_mse_diff_ci"]["b"] = [-0.01, 1.0]
  rows[0]["ca_mse_ci"] = [0.01, 0.5]
  assert not grad_error.settled(rows, 0.1)
