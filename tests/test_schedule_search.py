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
  assert imported <= {"__future__", "vit_accel"}, imported
