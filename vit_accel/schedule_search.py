"""Schedule search: a compression schedule from gradient-error tables (Lin et al., NeurIPS 2024:
follow the strategy of lowest CA-MSE along training).

Each analysed checkpoint stands for the budget interval around it (boundaries half-way between
neighbouring checkpoints; the first interval starts at 0, the last ends at 1). In each interval the
strategy with the lowest CA-MSE wins; strategies whose CA-MSE intervals overlap the lowest one's
(`search.ties='interval'`; or within `search.tie_tolerance` of it, 'tolerance') count as tied and the
cheapest of them wins (a cheaper step is a sure gain, a difference within the noise is not).
With a prior schedule (`search.prior`, by default the recipe's hand-set one) the prior's strategy
for the interval is the incumbent: it stands unless some candidate's CA-MSE is below its own with
confidence, and only those candidates compete for the interval (under the rule above). Few
measured batches then leave the prior in place instead of handing every interval to the cheapest
candidate. `search.monotone` lets compression only relax along training. Neighbouring intervals
with the same winner merge. The result is a schedule string that training accepts as-is
(`schedule` or, written to a file by --mode=search, `schedule_file`).

Pure: tables in, stages and text out (no JAX, no files). --mode=search (vit_accel/modes/search.py)
reads grad_error.json and writes WORKDIR/schedule.txt; the online schedule (online.py) uses `choose`.
"""
from __future__ import annotations

from vit_accel.errors import UserError


def relative_cost(row: dict) -> float:
  """A row's step cost for comparing rows of one table: the measured ratio to full length
  (--mode=cost's table, `cost_ratio`) where the gradient-error run had one, else the analytic cost
  model's units per sample (not a ratio, but ordered the same way)."""
  return float(row.get("cost_ratio", row["cost_units"]))


def lower_with_confidence(row: dict, than: dict, tie_tolerance: float, ties: str) -> bool:
  """Whether `row`'s CA-MSE is below `than`'s with confidence: its estimate is lower and, under
  ties='interval', the interval of their paired difference (`ca_mse_diff_ci`) lies below 0, or in
  tables without paired differences the intervals do not overlap; else (or without intervals)
  below by more than tie_tolerance (row x (1 + tie_tolerance) < than). The estimate must agree:
  at a few batches the percentile bootstrap is biased (a resample with duplicated batches has a
  smaller variance; the full-length row's draws sit below its estimate), so a difference interval
  can lie wholly on the other side of the measured difference."""
  if row["ca_mse"] >= than["ca_mse"]:
    return False
  if ties == "interval" and "ca_mse_diff_ci" in row:
    return row["ca_mse_diff_ci"][than["strategy"]][1] < 0.0
  if ties == "interval" and "ca_mse_ci" in row and "ca_mse_ci" in than:
    return row["ca_mse_ci"][1] < than["ca_mse_ci"][0]
  return row["ca_mse"] * (1.0 + tie_tolerance) < than["ca_mse"]


def choose(rows: list[dict], tie_tolerance: float, ties: str = "interval",
           min_cost: float = 0.0, prior: str | None = None) -> dict:
  """Which strategy one table picks, and why.

  The lowest CA-MSE is the best; the rows tied with it are, under ties='interval' (when every row
  has intervals), those not higher than the best with confidence: the interval of their paired
  CA-MSE difference to the best (`ca_mse_diff_ci`) reaches 0, or, in tables without paired
  differences, their interval reaches the best one's; else (ties='tolerance', or tables without
  intervals) those within (1 + tie_tolerance) x the lowest value. The cheapest tied row wins (then
  the lower CA-MSE): a cheaper step is a sure gain, a CA-MSE difference within the noise is not.
  `min_cost` > 0 (monotone schedules) first drops the rows cheaper than it (relative_cost), keeping
  at least the most expensive row.

  `prior` (a strategy spec, the prior schedule's for this table's progress): that row is the
  incumbent and wins unless some allowed row is lower with confidence (lower_with_confidence);
  if some are, the rule above picks among them. A prior the monotone rule excludes is no
  incumbent. Raises UserError when `prior` is not a row of the table (not measured).
  Returns {"winner": row, "best", "tied", "excluded": [strategy specs], "rule": str, "prior":
  spec or None, "challengers": [specs below the prior with confidence]}.
  """
  if prior is not None and not any(r["strategy"] == prior for r in rows):
    raise UserError(f"search.prior's strategy {prior!r} was not measured (this table has "
                    f"{', '.join(r['strategy'] for r in rows)}); add it to the candidates "
                    f"(grad_error.candidates / online.candidates) or set search.prior=''")
  allowed = [r for r in rows if relative_cost(r) >= min_cost - 1e-12]
  if not allowed:
    allowed = [max(rows, key=relative_cost)]
  excluded = [r["strategy"] for r in rows if r not in allowed]
  incumbent = next((r for r in allowed if r["strategy"] == prior), None)
  challengers = None
  if incumbent is not None:
    challengers = [r for r in allowed
                   if r is not incumbent and lower_with_confidence(r, incumbent, tie_tolerance,
                                                                   ties)]
    if not challengers:
      return {"winner": incumbent, "best": min(allowed, key=lambda r: r["ca_mse"])["strategy"],
              "tied": [], "excluded": excluded, "rule": "", "prior": prior, "challengers": []}
    allowed = challengers
  best = min(allowed, key=lambda r: r["ca_mse"])
  if ties == "interval" and all("ca_mse_diff_ci" in r for r in allowed):
    tied = [r for r in allowed
            if r is best or r["ca_mse_diff_ci"][best["strategy"]][0] <= 0.0]
    rule = "paired difference to the lowest CA-MSE not above 0 with confidence"
  elif ties == "interval" and all("ca_mse_ci" in r for r in allowed):
    high = best["ca_mse_ci"][1]
    tied = [r for r in allowed if r["ca_mse_ci"][0] <= high]
    rule = "intervals overlapping the lowest CA-MSE's"
  else:
    tied = [r for r in allowed if r["ca_mse"] <= best["ca_mse"] * (1.0 + tie_tolerance)]
    rule = f"within {tie_tolerance:.0%} of the lowest CA-MSE"
  winner = min(tied, key=lambda r: (relative_cost(r), r["ca_mse"]))
  return {"winner": winner, "best": best["strategy"], "tied": [r["strategy"] for r in tied],
          "excluded": excluded, "rule": rule, "prior": prior if incumbent is not None else None,
          "challengers": [r["strategy"] for r in challengers or []]}


def pick(rows: list[dict], tie_tolerance: float, ties: str = "interval",
         min_cost: float = 0.0, prior: str | None = None) -> dict:
  """The row `choose` picks."""
  return choose(rows, tie_tolerance, ties, min_cost, prior)["winner"]


def prior_at(prior: list[tuple[float, str]] | None, progress: float) -> str | None:
  """The strategy spec a prior schedule ([(stage end, spec)], ends increasing, the last 1) runs at
  budget fraction `progress` (the stage with start <= progress < end); None without a prior."""
  if not prior:
    return None
  return next((spec for end, spec in prior if progress < end), prior[-1][1])


def describe(progress: float, choice: dict, rows: list[dict]) -> str:
  """One line: why this table's strategy was chosen (for the plan file and the log)."""
  def value(spec):
    r = next(r for r in rows if r["strategy"] == spec)
    ci = r.get("ca_mse_ci")
    return f"{r['ca_mse']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
  winner = choice["winner"]["strategy"]
  text = f"at {progress:.0%}: lowest CA-MSE {choice['best']} {value(choice['best'])}"
  if choice.get("prior") and not choice["challengers"]:
    return (text + f"; none below the prior's {choice['prior']} {value(choice['prior'])} with "
            f"confidence -> the prior's" + (f"; cheaper than the previous stage, so not allowed: "
                                            f"{', '.join(choice['excluded'])}"
                                            if choice["excluded"] else ""))
  if choice.get("prior"):
    text = (f"at {progress:.0%}: below the prior's {choice['prior']} {value(choice['prior'])} "
            f"with confidence: " + ", ".join(f"{t} {value(t)}" for t in choice["challengers"])
            + f"; the lowest of them {choice['best']}")
  others = [t for t in choice["tied"] if t != choice["best"]]
  if others:
    text += (f"; tied ({choice['rule']}): " + ", ".join(f"{t} {value(t)}" for t in others)
             + f" -> the cheapest, {winner} (cost {relative_cost(choice['winner']):.3g})")
  if choice["excluded"]:
    text += f"; cheaper than the previous stage, so not allowed: {', '.join(choice['excluded'])}"
  return text


def search_stages(tables: list[dict], tie_tolerance: float, final_full: bool = False,
                  ties: str = "interval", monotone: bool = False,
                  prior: list[tuple[float, str]] | None = None) -> list[dict]:
  """[{end, strategy, cost_units, progress_points, why}] from tables sorted by progress. `final_full`:
  the last interval runs at full length whatever it measured (CA-MSE scores gradients at the
  compressed length and cannot see the train/eval length mismatch a final full stage removes).
  `monotone`: compression only relaxes along training (each interval's strategy costs at least the
  previous one's). `prior` ([(stage end, spec)], e.g. the recipe's hand-set schedule): each table's
  incumbent is the prior's strategy at its progress (`choose`). `why` holds one `describe` line per
  table of the stage."""
  if not tables:
    raise UserError("no gradient-error tables to search a schedule from; run --mode=grad_error "
                    "first")
  tables = sorted(tables, key=lambda t: t["progress"])
  stages = []
  min_cost = 0.0
  for i, table in enumerate(tables):
    end = 1.0 if i == len(tables) - 1 else (table["progress"] + tables[i + 1]["progress"]) / 2
    choice = choose(table["rows"], tie_tolerance, ties, min_cost if monotone else 0.0,
                    prior_at(prior, table["progress"]))
    winner = choice["winner"]
    why = describe(table["progress"], choice, table["rows"])
    if final_full and i == len(tables) - 1:
      winner = next(r for r in table["rows"] if r["strategy"] == "full")
      why += "; the last interval runs at full length (search.final_full)"
    min_cost = relative_cost(winner)
    if stages and stages[-1]["strategy"] == winner["strategy"]:
      stages[-1]["end"] = end
      stages[-1]["progress_points"].append(table["progress"])
      stages[-1]["why"].append(why)
    else:
      stages.append({"end": end, "strategy": winner["strategy"],
                     "cost_units": winner["cost_units"], "progress_points": [table["progress"]],
                     "why": [why]})
  return stages


def schedule_string(stages: list[dict]) -> str:
  """The stages as a schedule training reads: 'END:SPEC; ...', the last END exactly 1."""
  parts = []
  for s in stages:
    end = 1.0 if s is stages[-1] else round(s["end"], 4)
    parts.append(f"{end:g}:{s['strategy']}")
  return "; ".join(parts)


def samples_vs_baseline(stages: list[dict], full_cost: float) -> float:
  """Training samples the schedule processes for the budget, relative to the uncompressed baseline
  (each stage's share of the budget divided by its cost relative to full length)."""
  start, total = 0.0, 0.0
  for s in stages:
    total += (s["end"] - start) * full_cost / s["cost_units"]
    start = s["end"]
  return total
