"""The schedule search from gradient-error tables: pure functions, no JAX, no files."""
import ml_collections
import pytest

from vit_accel import schedule_search, step_plan

MODEL = ml_collections.ConfigDict(dict(width=128, depth=4, mlp_ratio=4.0, patch_size=4,
                                       image_size=32))


def row(strategy, ca_mse, cost):
  return {"strategy": strategy, "ca_mse": ca_mse, "cost_units": cost}


def test_search_picks_the_lowest_ca_mse_and_breaks_ties_by_cost():
  rows = [row("full", 0.30, 8.0), row("keep0.5|keep0.5", 0.20, 4.0),
          row("keep0.25|keep0.25", 0.205, 2.0)]
  assert schedule_search.pick(rows, tie_tolerance=0.0)["strategy"] == "keep0.5|keep0.5"
  assert schedule_search.pick(rows, tie_tolerance=0.05)["strategy"] == "keep0.25|keep0.25"


def test_search_intervals_merge_and_round_trip_through_the_schedule_config(tmp_path):
  tables = [  # given out of order: the search sorts by progress
      {"progress": 0.6, "rows": [row("full", 0.1, 8.0), row("patch8|patch8", 0.3, 2.0)]},
      {"progress": 0.1, "rows": [row("full", 0.5, 8.0), row("patch8|patch8", 0.2, 2.0)]},
      {"progress": 0.3, "rows": [row("full", 0.4, 8.0), row("patch8|patch8", 0.25, 2.0)]},
      {"progress": 0.9, "rows": [row("full", 0.05, 8.0), row("patch8|patch8", 0.4, 2.0)]}]
  stages = schedule_search.search_stages(tables, tie_tolerance=0.0)
  assert [s["strategy"] for s in stages] == ["patch8|patch8", "full"]
  assert stages[0]["end"] == pytest.approx(0.45)  # half-way between the 30% and 60% checkpoints
  text = schedule_search.schedule_string(stages)
  assert text == "0.45:patch8|patch8; 1:full"
  parsed = step_plan.parse_schedule(text, 8, MODEL)
  assert [s.end for s in parsed] == [0.45, 1.0]
  assert [s.strategies.spec for s in parsed] == ["patch8|patch8", "full"]
  # 45% of the budget at a quarter of the cost: 0.45 * 4 + 0.55 = 2.35x the baseline's samples
  assert schedule_search.samples_vs_baseline(stages, 8.0) == pytest.approx(2.35)
  # final_full overrides only the last interval's winner.
  late_patch = [dict(t, rows=[row("full", 0.5, 8.0), row("patch8|patch8", 0.2, 2.0)]) for t in tables]
  search = schedule_search.search_stages
  assert schedule_search.schedule_string(search(late_patch, 0.0)) == "1:patch8|patch8"
  assert schedule_search.schedule_string(search(late_patch, 0.0, final_full=True)) == \
      "0.75:patch8|patch8; 1:full"


def test_the_search_imports_neither_jax_nor_files():
  import ast
  tree = ast.parse(open(schedule_search.__file__).read())
  imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
  assert imported <= {"__future__", "math", "vit_accel"}, imported   # the standard library's math only


def ci_row(strategy, ca_mse, low, high, cost):
  return {**row(strategy, ca_mse, cost), "ca_mse_ci": [low, high]}


def test_overlapping_intervals_tie_and_the_cheaper_wins():
  rows = [ci_row("full", 0.20, 0.17, 0.23, 8.0), ci_row("keep0.5|keep0.5", 0.18, 0.15, 0.21, 4.0),
          ci_row("keep0.25|keep0.25", 0.30, 0.22, 0.40, 2.0),
          ci_row("patch8|patch8", 0.40, 0.35, 0.45, 1.0)]
  choice = schedule_search.choose(rows, tie_tolerance=0.0)
  # keep0.25's interval reaches the best's (0.22 <= 0.21? no -> 0.22 > 0.21): not tied
  assert choice["best"] == "keep0.5|keep0.5"
  assert choice["tied"] == ["full", "keep0.5|keep0.5"]
  assert choice["winner"]["strategy"] == "keep0.5|keep0.5"
  rows[2]["ca_mse_ci"] = [0.21, 0.40]      # now it overlaps: tied, and cheapest
  assert schedule_search.pick(rows, 0.0)["strategy"] == "keep0.25|keep0.25"
  # The same rows under the fixed-tolerance rule ignore the intervals.
  assert schedule_search.pick(rows, 0.0, ties="tolerance")["strategy"] == "keep0.5|keep0.5"
  # Tables without intervals (older grad_error.json) fall back to the tolerance rule.
  assert schedule_search.pick([row("full", 0.2, 8.0), row("keep0.5", 0.205, 4.0)],
                              0.05)["strategy"] == "keep0.5"


def test_measured_cost_ratio_decides_which_tied_strategy_is_cheaper():
  rows = [ci_row("keep0.5|keep0.5", 0.20, 0.1, 0.3, 4.0), ci_row("patch8|patch8", 0.21, 0.1, 0.3,
                                                                    2.0)]
  assert schedule_search.pick(rows, 0.0)["strategy"] == "patch8|patch8"
  rows[0]["cost_ratio"], rows[1]["cost_ratio"] = 0.4, 0.6   # measured: token keep runs faster
  assert schedule_search.pick(rows, 0.0)["strategy"] == "keep0.5|keep0.5"


def test_monotone_search_never_compresses_more_later_and_says_why():
  tables = [
      {"progress": 0.1, "rows": [ci_row("full", 0.5, 0.45, 0.55, 8.0),
                                 ci_row("keep0.5|keep0.5", 0.2, 0.18, 0.22, 4.0),
                                 ci_row("patch8|patch8", 0.3, 0.28, 0.32, 2.0)]},
      {"progress": 0.5, "rows": [ci_row("full", 0.5, 0.45, 0.55, 8.0),
                                 ci_row("keep0.5|keep0.5", 0.3, 0.28, 0.32, 4.0),
                                 ci_row("patch8|patch8", 0.2, 0.18, 0.22, 2.0)]},
      {"progress": 0.9, "rows": [ci_row("full", 0.1, 0.05, 0.15, 8.0),
                                 ci_row("keep0.5|keep0.5", 0.3, 0.28, 0.32, 4.0),
                                 ci_row("patch8|patch8", 0.2, 0.18, 0.22, 2.0)]}]
  free = schedule_search.search_stages(tables, 0.0)
  assert [s["strategy"] for s in free] == ["keep0.5|keep0.5", "patch8|patch8", "full"]
  mono = schedule_search.search_stages(tables, 0.0, monotone=True)
  assert [s["strategy"] for s in mono] == ["keep0.5|keep0.5", "full"]
  costs = [s["cost_units"] for s in mono]
  assert costs == sorted(costs)
  assert "not allowed: patch8|patch8" in mono[0]["why"][1]
  assert mono[0]["why"][0].startswith("at 10%: lowest CA-MSE keep0.5|keep0.5 0.2000 [0.1800")


def test_paired_differences_decide_ties_when_the_table_has_them():
  a = {**ci_row("keep0.5|keep0.5", 0.20, 0.15, 0.25, 4.0),
       "ca_mse_diff_ci": {"keep0.25|keep0.25": [-0.03, -0.01]}}
  b = {**ci_row("keep0.25|keep0.25", 0.22, 0.17, 0.27, 2.0),
       "ca_mse_diff_ci": {"keep0.5|keep0.5": [0.01, 0.03]}}
  # The intervals overlap, but on the same batches b is higher with confidence: not a tie.
  choice = schedule_search.choose([a, b], 0.0)
  assert choice["tied"] == ["keep0.5|keep0.5"] and choice["winner"] is a
  b["ca_mse_diff_ci"]["keep0.5|keep0.5"] = [-0.005, 0.03]    # not resolved: tied, cheaper wins
  assert schedule_search.pick([a, b], 0.0) is b


def paired(strategy, ca_mse, cost, diffs):
  """A row with paired-difference intervals: diffs {other: [low, high]} of this minus other."""
  return {**ci_row(strategy, ca_mse, ca_mse * 0.8, ca_mse * 1.2, cost), "ca_mse_diff_ci": diffs}


def test_a_prior_stands_until_a_candidate_is_below_it_with_confidence():
  full = paired("full", 0.30, 8.0, {"patch8|patch8": [-0.1, 0.2], "keep0.25|keep0.25": [0.0, 0.3]})
  patch = paired("patch8|patch8", 0.25, 2.0, {"full": [-0.2, 0.1],
                                              "keep0.25|keep0.25": [-0.05, 0.2]})
  keep = paired("keep0.25|keep0.25", 0.15, 1.0, {"full": [-0.3, 0.02],
                                                 "patch8|patch8": [-0.2, 0.05]})
  rows = [full, patch, keep]
  # Without a prior the unresolved table goes to the cheapest.
  assert schedule_search.pick(rows, 0.0) is keep
  # With one, nothing is below the prior with confidence: the prior stands, and says so.
  choice = schedule_search.choose(rows, 0.0, prior="patch8|patch8")
  assert choice["winner"] is patch and choice["challengers"] == []
  assert "none below the prior's patch8|patch8" in schedule_search.describe(0.1, choice, rows)
  # Once the measurement resolves keep0.25 below the prior, it takes the interval.
  keep["ca_mse_diff_ci"]["patch8|patch8"] = [-0.2, -0.01]
  choice = schedule_search.choose(rows, 0.0, prior="patch8|patch8")
  assert choice["winner"] is keep and choice["challengers"] == ["keep0.25|keep0.25"]
  assert "below the prior's patch8|patch8" in schedule_search.describe(0.1, choice, rows)
  # A difference interval below 0 around an estimate above the prior's (a biased bootstrap at a
  # few batches) is no confidence: the estimate must agree.
  full["ca_mse_diff_ci"]["patch8|patch8"] = [-0.3, -0.01]
  assert full["ca_mse"] > patch["ca_mse"]
  assert schedule_search.choose(rows, 0.0, prior="patch8|patch8")["challengers"] == \
      ["keep0.25|keep0.25"]
  # A prior the monotone rule excludes is no incumbent: the usual rule among the allowed rows.
  assert schedule_search.pick(rows, 0.0, min_cost=8.0, prior="patch8|patch8") is full
  # Without intervals: below by more than the tolerance.
  plain = [row("full", 0.30, 8.0), row("patch8|patch8", 0.25, 2.0), row("keep0.25", 0.24, 1.0)]
  assert schedule_search.pick(plain, 0.05, ties="tolerance", prior="full")["strategy"] == \
      "keep0.25"
  assert schedule_search.pick(plain, 0.5, ties="tolerance", prior="full")["strategy"] == "full"
  with pytest.raises(schedule_search.UserError, match="search.prior's strategy 'keep0.5'"):
    schedule_search.choose(rows, 0.0, prior="keep0.5")


def test_search_stages_follow_the_prior_schedule_where_measurements_cannot_separate():
  unresolved = [paired("full", 0.3, 8.0, {"patch8|patch8": [-0.1, 0.1], "keep0.5": [-0.1, 0.1]}),
                paired("patch8|patch8", 0.2, 2.0, {"full": [-0.1, 0.1], "keep0.5": [-0.1, 0.1]}),
                paired("keep0.5", 0.25, 4.0, {"full": [-0.1, 0.1], "patch8|patch8": [-0.1, 0.1]})]
  tables = [{"progress": p, "rows": unresolved} for p in (0.1, 0.4, 0.7, 0.9)]
  prior = step_plan.parse_schedule("0.5:keep0.5; 1:full", 8, MODEL)
  prior = [(s.end, s.strategies.spec) for s in prior]
  assert schedule_search.prior_at(prior, 0.49) == "keep0.5"
  assert schedule_search.prior_at(prior, 0.5) == "full"
  stages = schedule_search.search_stages(tables, 0.0, prior=prior)
  # Where the prior stands it runs its own stages: its boundary at 0.5, not the tables' 0.55.
  assert schedule_search.schedule_string(stages) == "0.5:keep0.5; 1:full"
  assert [len(s["why"]) for s in stages] == [2, 2]   # each table's reason on its own stage
  assert schedule_search.schedule_string(schedule_search.search_stages(tables, 0.0)) == \
      "1:patch8|patch8"


def test_batches_to_displace_is_the_sign_flip_floor_at_the_bonferroni_level():
  """n is the fewest batches whose all-one-sign outcome (probability 2^-n under no difference)
  is rare enough for one of k tests at the one-sided level (1 - ci_level) / 2."""
  for ci_level in (0.8, 0.9, 0.95, 0.99):
    for k in range(1, 9):
      n = schedule_search.batches_to_displace(k, ci_level)
      alpha = (1 - ci_level) / 2 / k
      assert 2.0 ** -n <= alpha * (1 + 1e-9) < 2.0 ** -(n - 1)
  assert [schedule_search.batches_to_displace(k, 0.9) for k in (1, 2, 3, 5)] == [5, 6, 6, 7]
  with pytest.raises(schedule_search.UserError, match="grad_error.ci_level=1.0 must lie"):
    schedule_search.batches_to_displace(2, 1.0)


def test_a_prior_is_displaced_only_on_enough_batches_at_the_shared_level():
  def measured(strategy, ca_mse, cost, n, p):
    """A row measured on n batches; p {other: share of draws where this row is not lower}."""
    return {**paired(strategy, ca_mse, cost, {o: [-0.2, -0.01] for o in p}), "num_batches": n,
            "ca_mse_diff_p": p}
  prior = measured("patch8|patch8", 0.30, 2.0, 4, {"keep0.5|keep0.5": 1.0})
  keep = measured("keep0.5|keep0.5", 0.20, 4.0, 4, {"patch8|patch8": 0.0})
  # Every draw says keep0.5 is lower, but 4 batches cannot say so at the 5% one-sided level.
  choice = schedule_search.choose([prior, keep], 0.0, prior="patch8|patch8")
  assert choice["winner"] is prior and choice["too_few"] == ["keep0.5|keep0.5"]
  assert choice["needed_batches"] == 5
  assert ">= 5 batches each" in schedule_search.describe(0.3, choice, [prior, keep])
  prior["num_batches"] = keep["num_batches"] = 5
  assert schedule_search.pick([prior, keep], 0.0, prior="patch8|patch8") is keep
  # The fewer of the two rows' batches counts (full length is measured on the reference ones).
  prior["num_batches"] = 4
  assert schedule_search.pick([prior, keep], 0.0, prior="patch8|patch8") is prior
  prior["num_batches"] = 5
  # A bootstrap p-value of 3%: enough against one challenger (5%), not against three (1.7% each),
  # though its 90% interval lies below 0 either way.
  keep["ca_mse_diff_p"]["patch8|patch8"] = 0.03
  assert schedule_search.pick([prior, keep], 0.0, prior="patch8|patch8") is keep
  rows = [prior, keep, measured("full", 0.5, 8.0, 8, {"patch8|patch8": 1.0}),
          measured("keep0.25|keep0.25", 0.6, 1.0, 8, {"patch8|patch8": 1.0})]
  for r in rows[2:]:
    r["num_batches"] = 8
  keep["num_batches"] = prior["num_batches"] = 8
  assert schedule_search.pick(rows, 0.0, prior="patch8|patch8") is prior
  keep["ca_mse_diff_p"]["patch8|patch8"] = 0.01
  assert schedule_search.pick(rows, 0.0, prior="patch8|patch8") is keep
  # A row lower than the prior on too few batches is named even where another displaces it.
  rows[3].update(ca_mse=0.25, num_batches=4, ca_mse_diff_p={"patch8|patch8": 0.0})
  choice = schedule_search.choose(rows, 0.0, prior="patch8|patch8")
  assert choice["winner"] is keep and choice["too_few"] == ["keep0.25|keep0.25"]
  assert "(also lower, but on fewer than 6 batches: keep0.25|keep0.25)" in \
      schedule_search.describe(0.3, choice, rows)


def test_a_prior_that_stands_everywhere_comes_out_as_itself():
  """The pilot's milestones (10/35/60/90%) cut the budget at 0.225, 0.475 and 0.75; the preset's
  boundaries (0.55, 0.8) fall inside those intervals and are kept, with search.final_full too."""
  specs = ("full", "patch8|patch8", "keep0.5|keep0.5", "keep0.25|keep0.25")
  costs = {"full": 8.0, "patch8|patch8": 2.0, "keep0.5|keep0.5": 4.0, "keep0.25|keep0.25": 1.0}
  rows = [paired(s, 0.3, costs[s], {o: [-0.1, 0.1] for o in specs if o != s}) for s in specs]
  tables = [{"progress": p, "rows": rows} for p in (0.1, 0.35, 0.6, 0.9)]
  text = "0.55:patch8|patch8; 0.8:keep0.5|keep0.5; 1:full"
  prior = [(s.end, s.strategies.spec) for s in step_plan.parse_schedule(text, 8, MODEL)]
  for final_full in (False, True):
    for monotone in (False, True):
      stages = schedule_search.search_stages(tables, 0.0, final_full, monotone=monotone,
                                             prior=prior)
      assert schedule_search.schedule_string(stages) == text
  # A prior that ends compressed still gets its final full interval.
  compressed = [(0.55, "patch8|patch8"), (1.0, "keep0.5|keep0.5")]
  stages = schedule_search.search_stages(tables, 0.0, True, prior=compressed)
  assert schedule_search.schedule_string(stages) == \
      "0.55:patch8|patch8; 0.75:keep0.5|keep0.5; 1:full"
  assert stages[-1]["why"][-1].endswith("runs at full length (search.final_full)")
  # Where a challenger takes an interval, that interval is the challenger's, whole.
  keep = next(r for r in rows if r["strategy"] == "keep0.25|keep0.25")
  won = [dict(r) for r in rows]
  won[3] = {**keep, "ca_mse": 0.1, "ca_mse_diff_ci": {o: [-0.2, -0.1] for o in specs[:3]}}
  tables[2] = {"progress": 0.6, "rows": won}
  stages = schedule_search.search_stages(tables, 0.0, True, prior=prior)
  assert schedule_search.schedule_string(stages) == \
      "0.475:patch8|patch8; 0.75:keep0.25|keep0.25; 0.8:keep0.5|keep0.5; 1:full"


def test_a_prior_stage_the_table_rejects_does_not_run_where_another_of_its_stages_stands():
  """The pilot's 60% table stands for 47.5%-75% of the budget; the preset's patch8 runs to 55%
  inside it. keep0.5|keep0.5 (the preset's strategy at 60%) stands, but the same table puts
  patch8 above both keep strategies with confidence: patch8 gives way there, to the cheapest of
  the rows below it (the rule a table applies to any incumbent)."""
  specs = ("full", "patch8|patch8", "keep0.5|keep0.5", "keep0.25|keep0.25")
  costs = {"full": 8.0, "patch8|patch8": 2.0, "keep0.5|keep0.5": 4.0, "keep0.25|keep0.25": 2.0}
  tied = [paired(s, 0.3, costs[s], {o: [-0.1, 0.1] for o in specs if o != s}) for s in specs]
  ca = {"full": 0.30, "patch8|patch8": 0.60, "keep0.5|keep0.5": 0.25, "keep0.25|keep0.25": 0.28}

  def diff(a, b):
    if "patch8|patch8" in (a, b):     # patch8 against anything: resolved
      return [ca[a] - ca[b] - 0.05, ca[a] - ca[b] + 0.05]
    return [-0.1, 0.1]                # the rest: within the noise
  rejecting = [paired(s, ca[s], costs[s], {o: diff(s, o) for o in specs if o != s}) for s in specs]
  tables = [{"progress": p, "rows": tied} for p in (0.1, 0.35, 0.9)]
  tables.insert(2, {"progress": 0.6, "rows": rejecting})
  text = "0.55:patch8|patch8; 0.8:keep0.5|keep0.5; 1:full"
  prior = [(s.end, s.strategies.spec) for s in step_plan.parse_schedule(text, 8, MODEL)]
  stages = schedule_search.search_stages(tables, 0.0, True, prior=prior)
  assert schedule_search.schedule_string(stages) == \
      "0.475:patch8|patch8; 0.55:keep0.25|keep0.25; 0.8:keep0.5|keep0.5; 1:full"
  why = next(w for s in stages for w in s["why"] if w.startswith("at 60%"))
  assert "displaced on this table: the prior's patch8|patch8 over 47.5%-55.0% -> " \
         "keep0.25|keep0.25" in why
  # Under the monotone rule keep0.25 (cheaper than nothing before it) may take patch8's place,
  # and keep0.5 after it; a piece is never cheaper than the one before.
  stages = schedule_search.search_stages(tables, 0.0, True, monotone=True, prior=prior)
  assert schedule_search.schedule_string(stages) == \
      "0.475:patch8|patch8; 0.55:keep0.25|keep0.25; 0.8:keep0.5|keep0.5; 1:full"
  # The last interval's full-length stage is not put to the table under search.final_full (it
  # runs full length either way); its other stages are. The 70% table stands for 55%-100%.
  def diff_full(a, b, margin=0.02):   # here full is resolved against everything as well
    if {"patch8|patch8", "full"} & {a, b}:
      return [ca[a] - ca[b] - margin, ca[a] - ca[b] + margin]
    return [-0.1, 0.1]
  against_full = [paired(s, ca[s], costs[s], {o: diff_full(s, o) for o in specs if o != s})
                  for s in specs]
  late = [dict(tables[0], progress=0.1), {"progress": 0.4, "rows": against_full}]
  late_prior = [(0.5, "keep0.5|keep0.5"), (0.6, "patch8|patch8"), (1.0, "full")]
  stages = schedule_search.search_stages(late, 0.0, True, prior=late_prior)
  assert schedule_search.schedule_string(stages) == \
      "0.5:keep0.5|keep0.5; 0.6:keep0.25|keep0.25; 1:full"
  why = stages[0]["why"][-1]
  assert why.startswith("at 40%") and "the prior's stages end at full length" in why
  assert "patch8|patch8 over 50.0%-60.0% -> keep0.25|keep0.25" in why and "full over" not in why
  # Where no table rejects a prior stage, the prior comes out as itself (as before).
  tables[2] = {"progress": 0.6, "rows": tied}
  assert schedule_search.schedule_string(
      schedule_search.search_stages(tables, 0.0, True, prior=prior)) == text


def test_unmeasured_tables_run_a_prior_unchanged_under_the_monotone_rule_too():
  """With nothing measured no prior stage is displaced; a prior that breaks search.monotone
  inside an interval runs the stage holding the table's progress over the whole interval."""
  unmeasured = [{"strategy": s, "cost_units": c}
                for s, c in (("full", 8.0), ("patch8|patch8", 2.0), ("keep0.5", 4.0))]
  tables = [{"progress": p, "rows": unmeasured} for p in (0.1, 0.35, 0.6, 0.9)]
  prior = [(0.3, "keep0.5"), (0.55, "patch8|patch8"), (1.0, "full")]
  stages = schedule_search.search_stages(tables, 0.0, True, monotone=True, prior=prior)
  assert schedule_search.schedule_string(stages) == "0.475:keep0.5; 1:full"
  assert not any("displaced" in w for s in stages for w in s["why"])
  stages = schedule_search.search_stages(tables, 0.0, True, prior=prior)
  assert schedule_search.schedule_string(stages) == "0.3:keep0.5; 0.55:patch8|patch8; 1:full"


def test_without_paired_differences_a_prior_yields_only_to_a_disjoint_interval():
  prior = ci_row("patch8|patch8", 0.30, 0.25, 0.35, 2.0)
  keep = ci_row("keep0.5|keep0.5", 0.20, 0.15, 0.26, 4.0)   # lower, but its interval reaches
  choice = schedule_search.choose([prior, keep], 0.0, prior="patch8|patch8")
  assert choice["winner"] is prior and choice["prior_rule"] == "with confidence"
  keep["ca_mse_ci"] = [0.15, 0.24]
  assert schedule_search.pick([prior, keep], 0.0, prior="patch8|patch8") is keep
  # Under ties='tolerance' the intervals are not read: lower by more than the tolerance is enough,
  # and the plan line says which rule it was.
  keep["ca_mse_ci"] = [0.15, 0.4]
  choice = schedule_search.choose([prior, keep], 0.4, ties="tolerance", prior="patch8|patch8")
  assert choice["winner"] is keep
  assert "below the prior's patch8|patch8 0.3000 [0.2500, 0.3500] by more than 40%" in \
      schedule_search.describe(0.5, choice, [prior, keep])
  assert schedule_search.pick([prior, keep], 0.6, ties="tolerance", prior="patch8|patch8") is prior


def test_a_prior_boundary_next_to_an_interval_end_leaves_no_sliver_stage():
  """Tables at 10/50.001/60.003/90%: the interval ends at 0.55002, a hair past the prior's 0.55;
  a challenger takes the next interval. The schedule must still parse (no 0.55 -> 0.55002 stage)."""
  specs = ("full", "patch8|patch8", "keep0.5|keep0.5", "keep0.25|keep0.25")
  costs = {"full": 8.0, "patch8|patch8": 2.0, "keep0.5|keep0.5": 4.0, "keep0.25|keep0.25": 1.0}
  rows = [paired(s, 0.3, costs[s], {o: [-0.1, 0.1] for o in specs if o != s}) for s in specs]
  won = [dict(r) for r in rows]
  won[3] = {**rows[3], "ca_mse": 0.1, "ca_mse_diff_ci": {o: [-0.2, -0.1] for o in specs[:3]}}
  tables = [{"progress": p, "rows": rows} for p in (0.1, 0.50001, 0.90)]
  tables.insert(2, {"progress": 0.60003, "rows": won})
  prior = [(0.55, "patch8|patch8"), (0.8, "keep0.5|keep0.5"), (1.0, "full")]
  stages = schedule_search.search_stages(tables, 0.0, True, prior=prior)
  text = schedule_search.schedule_string(stages)
  assert text == "0.55:patch8|patch8; 0.75:keep0.25|keep0.25; 0.8:keep0.5|keep0.5; 1:full"
  ends = [s["end"] for s in stages]
  assert all(b - a >= schedule_search.SLIVER for a, b in zip([0.0] + ends, ends))
  step_plan.parse_schedule(text, 8, MODEL)   # the schedule file reads back
  # Tables at one progress point (an empty interval) do not break the search.
  same = [{"progress": 0.5, "rows": rows} for _ in range(3)]
  assert schedule_search.schedule_string(schedule_search.search_stages(same, 0.0, prior=prior))


def test_unmeasured_tables_leave_the_prior_standing_under_the_search_rules():
  """Tables without CA-MSE (a pilot that could not afford measurements) give the prior, cut by the
  same rules as a measured search: final_full's last interval, slivers dropped, monotone."""
  costs = {"full": 8.0, "patch8|patch8": 2.0, "keep0.5|keep0.5": 4.0}
  rows = [{"strategy": s, "cost_units": c} for s, c in costs.items()]
  tables = [{"progress": p, "rows": rows} for p in (0.2, 0.5, 0.8)]
  prior = [(0.5, "patch8|patch8"), (1.0, "keep0.5|keep0.5")]
  choice = schedule_search.choose(rows, 0.0, prior="patch8|patch8")
  assert choice["winner"]["strategy"] == "patch8|patch8" and choice["best"] is None
  assert schedule_search.describe(0.2, choice, rows) == \
      "at 20%: nothing measured -> the prior's patch8|patch8"
  stages = schedule_search.search_stages(tables, 0.0, False, prior=prior)
  assert schedule_search.schedule_string(stages) == "0.5:patch8|patch8; 1:keep0.5|keep0.5"
  stages = schedule_search.search_stages(tables, 0.0, True, prior=prior)
  assert schedule_search.schedule_string(stages) == \
      "0.5:patch8|patch8; 0.65:keep0.5|keep0.5; 1:full"
  # A prior boundary within SLIVER of an interval's end is not kept, as in a measured search.
  near = [(0.6495, "patch8|patch8"), (1.0, "keep0.5|keep0.5")]
  stages = schedule_search.search_stages(tables, 0.0, True, prior=near)
  assert schedule_search.schedule_string(stages) == "0.65:patch8|patch8; 1:full"
  # Monotone: a prior stage cheaper than the one before it is no incumbent; with nothing
  # measured the cheapest allowed row runs.
  down = [(0.5, "keep0.5|keep0.5"), (1.0, "patch8|patch8")]
  stages = schedule_search.search_stages(tables, 0.0, False, monotone=True, prior=down)
  assert schedule_search.schedule_string(stages) == "1:keep0.5|keep0.5"
  assert stages[-1]["why"][-1] == ("at 80%: nothing measured; the cheapest allowed -> "
                                   "keep0.5|keep0.5; cheaper than the previous stage, so not "
                                   "allowed: patch8|patch8")
  # Without a prior, unmeasured tables pick the cheapest row (there is nothing to go on).
  assert schedule_search.pick(rows, 0.0)["strategy"] == "patch8|patch8"


def test_the_prior_is_spelled_as_the_measured_rows_that_run_the_same_program():
  config = ml_collections.ConfigDict({"model": MODEL, "compression": {"bucket": 8},
                                      "search": {"prior": "0.5:patch8|full|patch8; 1:full|full"}})
  assert step_plan.prior_stages(config) == [(0.5, "patch8|full|patch8"), (1.0, "full")]
  assert step_plan.prior_stages(config, ["full", "patch8|full", "keep0.5"]) == \
      [(0.5, "patch8|full"), (1.0, "full")]
  config.search.prior = ""
  assert step_plan.prior_stages(config, ["full"]) is None
