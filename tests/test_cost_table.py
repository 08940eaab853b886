"""--mode=cost: one row per distinct strategy, full length first, speed-ups relative to it."""
import pytest

from conftest import tiny_config
from vit_accel import compression, cost_table


def test_cost_table_rows():
  config = tiny_config(**{"compression.cost_candidates": ("keep0.25|keep0.25", "full|full"),
                          "compression.cost_repeats": 5})
  seen = []
  rows = cost_table.measure(config, on_row=seen.append)
  assert seen == rows
  assert [r["strategy"] for r in rows] == ["full", "keep0.25|keep0.25"]  # duplicate full dropped
  full, keep = rows
  assert full["measured_speedup"] == 1.0 and full["analytic_speedup"] == 1.0
  assert (full["seq_len"], keep["seq_len"], keep["key_seq_len"]) == (65, 17, 17)
  for r in rows:
    assert r["ms_per_step"] > 0
    assert r["analytic_flops"] == pytest.approx(
        r["analytic_units"] * compression.base_forward_flops(config.model) * config.batch_size)
  assert keep["analytic_speedup"] > 2.0
  assert keep["measured_speedup"] == pytest.approx(full["ms_per_step"] / keep["ms_per_step"])
  table = cost_table.format_table(rows).splitlines()
  assert len(table) == 4 and table[3].startswith("keep0.25|keep0.25")
