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
candidate: a challenger must also have been measured on at least `batches_to_displace` batches
(a bootstrap over 3 or 4 batches claims confidence that so few batches cannot give), and with k
challengers each is tested at 1/k of the one-sided level (Bonferroni), so that the chance that
noise displaces the prior stays at the level asked for. `search.monotone` lets compression only relax along training. Neighbouring intervals
with the same winner merge. The result is a schedule string that training accepts as-is
(`schedule` or, written to a file by --mode=search, `schedule_file`).

Pure: tables in, stages and text out (no JAX, no files). --mode=search (vit_accel/modes/search.py)
reads grad_error.json and writes WORKDIR/schedule.txt; the online schedule (online.py) uses `choose`.
"""
from __future__ import annotations

import math

from vit_accel.errors import UserError

# Bumped when a change to the rules below can change which schedule the same measurements give
# (benchmarks keep results per version). 2: the prior is displaced only on enough batches, at a
# level shared among the candidates, and where it stands its own stages run. 3: the bootstrap
# intervals are bias-corrected (grad_error.bias_corrected); when a measurement is skipped is unchanged.
# 4: where the prior stands, each of its stages inside the interval is tested on the table too.
# 5: the online schedule measures where online.measure_fraction of the budget pays for it (the
# pilot's rules are 4's).
RULES_VERSION = 5

# Narrowest stage (budget fraction) a search keeps from the prior: 0.1% - schedule files carry 4
# decimals, and a stage narrower than a step gets none.
SLIVER = 1e-3


def relative_cost(row: dict) -> float:
  """A row's step cost for comparing rows of one table: the measured ratio to full length
  (--mode=cost's table, `cost_ratio`) where the gradient-error run had one, else the analytic cost
  model's units per sample (not a ratio, but ordered the same way)."""
  return float(row.get("cost_ratio", row["cost_units"]))


def batches_to_displace(challengers: int, ci_level: float) -> int:
  """Fewest batches on which a measured challenger may displace the prior's strategy.

  With n paired batches, a test that assumes no more than exchangeable signs of the per-batch
  differences cannot reach a one-sided level below 2^-n (all n differences of one sign; Fisher's
  sign-flip test), and Efron's bootstrap, which claims more at n = 3 or 4, undercovers there. With
  `challengers` = k rows tested against the prior at the one-sided level (1 - ci_level) / 2, each
  test gets 1/k of it (Bonferroni), so n >= log2(2k / (1 - ci_level)): 5 batches for one challenger
  at ci_level 0.9, 6 for two or three, 7 for four to six. Raises UserError for ci_level outside (0, 1).
  """
  if not 0.0 < ci_level < 1.0:
    raise UserError(f"grad_error.ci_level={ci_level} must lie strictly between 0 and 1")
  alpha = (1.0 - ci_level) / 2.0 / max(1, int(challengers))
  return max(1, math.ceil(math.log2(1.0 / alpha) - 1e-9))


def lower_with_confidence(row: dict, than: dict, tie_tolerance: float, ties: str,
                          alpha: float | None = None) -> bool:
  """Whether `row`'s CA-MSE is below `than`'s with confidence: its estimate is lower and, under
  ties='interval', the paired difference is below 0 with confidence - the share of bootstrap draws
  where it is not (`ca_mse_diff_p`) at most `alpha` (one-sided level) when the table has it and
  `alpha` is given, else the difference's interval (`ca_mse_diff_ci`) lies below 0 - or in tables
  without paired differences the intervals do not overlap; else (or without intervals) below by
  more than tie_tolerance (row x (1 + tie_tolerance) < than). The estimate must agree: the draws are
  bias-corrected on average (grad_error.bias_corrected), but a skewed difference interval can
  still lie wholly on the other side of the measured difference."""
  if "ca_mse" not in row or "ca_mse" not in than or row["ca_mse"] >= than["ca_mse"]:
    return False   # an unmeasured row is never lower, and nothing is lower than it
  if ties == "interval" and alpha is not None and "ca_mse_diff_p" in row:
    return row["ca_mse_diff_p"][than["strategy"]] <= alpha
  if ties == "interval" and "ca_mse_diff_ci" in row:
    return row["ca_mse_diff_ci"][than["strategy"]][1] < 0.0
  if ties == "interval" and "ca_mse_ci" in row and "ca_mse_ci" in than:
    return row["ca_mse_ci"][1] < than["ca_mse_ci"][0]
  return row["ca_mse"] * (1.0 + tie_tolerance) < than["ca_mse"]


def choose(rows: list[dict], tie_tolerance: float, ties: str = "interval",
           min_cost: float = 0.0, prior: str | None = None, ci_level: float = 0.9) -> dict:
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
  incumbent and wins unless some allowed row is lower with confidence (lower_with_confidence, at
  the one-sided level (1 - ci_level) / 2 shared among the k other allowed rows) on at least
  batches_to_displace(k, ci_level) batches (the fewer of the two rows' `num_batches`; rows
  without it are not held to this); if some are, the rule above picks among them. A prior the
  monotone rule excludes is no incumbent. Rows without `ca_mse` are unmeasured (a pilot that could
  not afford measurements): never lower than another, so the prior stands; with no measured row
  and no incumbent, the cheapest allowed row wins ("best" None). Raises UserError when `prior` is
  not a row of the table.
  Returns {"winner": row, "best", "tied", "excluded": [strategy specs], "rule": str, "prior":
  spec or None, "challengers": [specs below the prior with confidence], "too_few": [specs lower
  than the prior but measured on too few batches to displace it], "needed_batches": int or None}.
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
  challengers, too_few, needed = None, [], None
  if incumbent is not None:
    others = [r for r in allowed if r is not incumbent]
    needed = batches_to_displace(len(others), ci_level)
    alpha = (1.0 - ci_level) / 2.0 / max(1, len(others))
    lower = [r for r in others
             if lower_with_confidence(r, incumbent, tie_tolerance, ties, alpha)]
    too_few = [r["strategy"] for r in lower if _batches(r, incumbent) < needed]
    challengers = [r for r in lower if r["strategy"] not in too_few]
    if not challengers:
      scored = [r for r in allowed if "ca_mse" in r]
      best = min(scored, key=lambda r: r["ca_mse"])["strategy"] if scored else None
      return {"winner": incumbent, "best": best,
              "tied": [], "excluded": excluded, "rule": "", "prior": prior, "challengers": [],
              "too_few": too_few, "needed_batches": needed,
              "prior_rule": _prior_rule(rows, tie_tolerance, ties)}
    allowed = challengers
  if not any("ca_mse" in r for r in allowed):
    # Nothing measured (tables of a pilot that could not afford measurements), and no incumbent
    # the monotone rule allows: the cheapest allowed row, the least compression it forbids.
    return {"winner": min(allowed, key=relative_cost), "best": None, "tied": [],
            "excluded": excluded, "rule": "the cheapest allowed", "prior": None,
            "challengers": [], "too_few": [], "needed_batches": needed,
            "prior_rule": _prior_rule(rows, tie_tolerance, ties)}
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
          "challengers": [r["strategy"] for r in challengers or []], "too_few": too_few,
          "needed_batches": needed, "prior_rule": _prior_rule(rows, tie_tolerance, ties)}


def _prior_rule(rows: list[dict], tie_tolerance: float, ties: str) -> str:
  """How lower_with_confidence judged "below the prior" for these rows, in words."""
  if ties == "interval" and all("ca_mse_ci" in r for r in rows):
    return "with confidence"
  return f"by more than {tie_tolerance:.0%}"


def _batches(row: dict, other: dict) -> float:
  """Batches behind the comparison of two rows: the fewer of their `num_batches` (inf when a
  table predates the count)."""
  return min(row.get("num_batches", math.inf), other.get("num_batches", math.inf))


def pick(rows: list[dict], tie_tolerance: float, ties: str = "interval",
         min_cost: float = 0.0, prior: str | None = None, ci_level: float = 0.9) -> dict:
  """The row `choose` picks."""
  return choose(rows, tie_tolerance, ties, min_cost, prior, ci_level)["winner"]


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
    if "ca_mse" not in r:
      return "(unmeasured)"
    ci = r.get("ca_mse_ci")
    return f"{r['ca_mse']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
  winner = choice["winner"]["strategy"]
  if choice["best"] is None:
    text = f"at {progress:.0%}: nothing measured"
    if choice.get("prior"):
      return text + f" -> the prior's {choice['prior']}"
    return (text + f"; {choice['rule']} -> {winner}" + (
        f"; cheaper than the previous stage, so not allowed: {', '.join(choice['excluded'])}"
        if choice["excluded"] else ""))
  text = f"at {progress:.0%}: lowest CA-MSE {choice['best']} {value(choice['best'])}"
  if choice.get("prior") and not choice["challengers"]:
    few = choice.get("too_few") or []
    return (text + f"; none below the prior's {choice['prior']} {value(choice['prior'])} "
            f"{choice['prior_rule']}" + (f" on enough batches ({', '.join(few)} lower, but displacing the "
                             f"prior takes >= {choice['needed_batches']} batches each)"
                             if few else "")
            + " -> the prior's" + (f"; cheaper than the previous stage, so not allowed: "
                                   f"{', '.join(choice['excluded'])}"
                                   if choice["excluded"] else ""))
  if choice.get("prior"):
    text = (f"at {progress:.0%}: below the prior's {choice['prior']} {value(choice['prior'])} "
            f"{choice['prior_rule']}: " + ", ".join(f"{t} {value(t)}" for t in choice["challengers"])
            + f"; the lowest of them {choice['best']}")
    if choice.get("too_few"):
      text += (f" (also lower, but on fewer than {choice['needed_batches']} batches: "
               f"{', '.join(choice['too_few'])})")
  others = [t for t in choice["tied"] if t != choice["best"]]
  if others:
    text += (f"; tied ({choice['rule']}): " + ", ".join(f"{t} {value(t)}" for t in others)
             + f" -> the cheapest, {winner} (cost {relative_cost(choice['winner']):.3g})")
  if choice["excluded"]:
    text += f"; cheaper than the previous stage, so not allowed: {', '.join(choice['excluded'])}"
  return text


def _prior_pieces(table: dict, inside: list[tuple[float, str]], start: float,
                  tie_tolerance: float, ties: str, monotone: bool, min_cost: float,
                  ci_level: float, final_full: bool, why: str) -> tuple[list, str]:
  """The pieces [(end, row)] of an interval where the prior stands at the table's progress:
  the prior's stages `inside` ([(end, spec)], from `start`), each other than the one holding the
  table's progress put to the table as the incumbent (`choose`; under `monotone` the previous
  piece's cost is the floor): a stage the table shows worse with confidence gives way to what
  displaces it. The holder stands (the table's own `choose` said so); under `final_full` a last stage at full
  length is not put to the test (it runs full length either way). Returns the pieces and `why`
  with the stages displaced named."""
  rows = {r["strategy"]: r for r in table["rows"]}
  pieces, floor, displaced = [], min_cost, []
  for k, ((e, spec), b) in enumerate(zip(inside, [start] + [e for e, _ in inside[:-1]])):
    holds = b <= table["progress"] < e or (k == len(inside) - 1 and table["progress"] >= e)
    if holds or (final_full and k == len(inside) - 1 and spec == "full"):
      held = rows[spec]
    else:
      held = choose(table["rows"], tie_tolerance, ties, floor if monotone else 0.0, spec,
                    ci_level)["winner"]
      if held["strategy"] != spec:
        reason = ("" if not monotone or relative_cost(rows[spec]) >= floor - 1e-12
                  else " (search.monotone: cheaper than the stage before)")
        displaced.append(f"the prior's {spec} over {b:.1%}-{e:.1%} -> {held['strategy']}"
                         + reason)
    pieces.append((e, held))
    floor = relative_cost(held)
  if displaced:
    why += "; displaced on this table: " + ", ".join(displaced)
  return pieces, why


def search_stages(tables: list[dict], tie_tolerance: float, final_full: bool = False,
                  ties: str = "interval", monotone: bool = False,
                  prior: list[tuple[float, str]] | None = None,
                  ci_level: float = 0.9) -> list[dict]:
  """[{end, strategy, cost_units, progress_points, why}] from tables sorted by progress. `final_full`:
  the last interval runs at full length whatever it measured (CA-MSE scores gradients at the
  compressed length and cannot see the train/eval length mismatch a final full stage removes).
  `monotone`: compression only relaxes along training (each interval's strategy costs at least the
  previous one's). `prior` ([(stage end, spec)], e.g. the recipe's hand-set schedule): each table's
  incumbent is the prior's strategy at its progress (`choose`, at `ci_level`); where it stands,
  the interval runs the prior's own stages, boundaries included, each of them the incumbent on
  that table in turn (`choose` with it as the prior, and under `monotone` the previous piece's cost
  as the floor): a prior stage the table shows worse with confidence gives way to what displaces
  it, so a prior that stands everywhere comes out as itself, and one of its stages that every
  table inside its span rejects does not run. With `final_full`, the last interval keeps the
  prior's stages only if the prior ends at full length. `why` holds one `describe` line per table, on the stage that holds its progress.
  """
  if not tables:
    raise UserError("no gradient-error tables to search a schedule from; run --mode=grad_error "
                    "first")
  tables = sorted(tables, key=lambda t: t["progress"])
  stages = []
  min_cost = 0.0

  def append(end, row, progress=None, why=None):
    if stages and stages[-1]["strategy"] == row["strategy"]:
      stages[-1]["end"] = end
    else:
      stages.append({"end": end, "strategy": row["strategy"], "cost_units": row["cost_units"],
                     "progress_points": [], "why": []})
    if why is not None:
      stages[-1]["progress_points"].append(progress)
      stages[-1]["why"].append(why)

  start = 0.0
  for i, table in enumerate(tables):
    last = i == len(tables) - 1
    end = 1.0 if last else (table["progress"] + tables[i + 1]["progress"]) / 2
    rows = {r["strategy"]: r for r in table["rows"]}
    choice = choose(table["rows"], tie_tolerance, ties, min_cost if monotone else 0.0,
                    prior_at(prior, table["progress"]), ci_level)
    winner = choice["winner"]
    why = describe(table["progress"], choice, table["rows"])
    pieces = [(end, winner)]
    if choice.get("prior") and not choice["challengers"]:
      # The prior stands: its own stages over [start, end), where the rules allow every one. A
      # prior boundary within SLIVER of the interval's own is not kept (a stage that narrow would
      # get no step, and its end would round onto its neighbour's in the schedule file).
      inside = [(min(e, end), spec)
                for (e, spec), b in zip(prior, [0.0] + [e for e, _ in prior[:-1]])
                if min(e, end) - max(b, start) >= SLIVER]
      if inside:
        inside[-1] = (end, inside[-1][1])
      costs = [relative_cost(rows[spec]) for _, spec in inside if spec in rows]
      ok = bool(inside) and len(costs) == len(inside) and (not monotone or (
          costs[0] >= min_cost - 1e-12 and all(b >= a - 1e-12 for a, b in zip(costs, costs[1:]))))
      # (A last interval whose prior stages do not end at full length runs full length whole.)
      if ok and not (last and final_full and inside[-1][1] != "full"):
        pieces, why = _prior_pieces(table, inside, start, tie_tolerance, ties, monotone,
                                    min_cost, ci_level, last and final_full, why)
    if last and final_full:
      if len(pieces) > 1 and pieces[-1][1]["strategy"] == "full":
        why += "; the prior's stages end at full length (search.final_full)"
      else:
        pieces = [(end, rows["full"])]
        why += "; the last interval runs at full length (search.final_full)"
    holder = next((k for k, (e, _) in enumerate(pieces) if table["progress"] < e),
                  len(pieces) - 1)
    for k, (e, row) in enumerate(pieces):
      if k == holder:
        append(e, row, table["progress"], why)
      else:
        append(e, row)
    min_cost = relative_cost(pieces[-1][1])
    start = end
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
