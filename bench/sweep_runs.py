"""One training run of a sweep, started through main.py as a user would, and its record.

Shared by bench/budget_sweep.py (accuracy against budget) and bench/schedule_comparison.py
(searched and online schedules against the preset): both keep their finished runs in one .jsonl per
objective, keyed by run_key, so a run one of them finished is not run again by the other.

Every run evaluates once, at its end, on one fixed protocol (PROTOCOL: kNN k=20 and a ridge linear
probe on a 10k train / 5k test subset, full-length features). A run's workdir is kept below
`workdir_root`, so an interrupted run resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from vit_accel.metric_writer import read_metrics  # noqa: E402
from vit_accel.schedule_search import RULES_VERSION  # noqa: E402

# One evaluation protocol for every run: the recipe's final one, written out so that a recipe
# change cannot silently change the protocol mid-sweep.
PROTOCOL = {"eval.final_bank_size": 10000, "eval.final_query_size": 5000, "eval.knn_k": 20,
            "eval.knn_temperature": 0.07, "eval.linear": "ridge"}


def define_flags() -> None:
  """The absl flags every sweep script shares: the recipe, overrides for every run, where runs and
  results go, report-only and dry-run modes (read back by runner_from_flags)."""
  from absl import flags
  flags.DEFINE_string("objective", "mocov3", "Which recipe: configs/fmnist_<objective>.py.")
  flags.DEFINE_string("config_arg", "", "Passed after the recipe as configs/fmnist_X.py:ARG "
                      "(e.g. 'smoke' for a tiny end-to-end check).")
  flags.DEFINE_list("extra", [], "More --config overrides for every run, e.g. "
                    "eval.linear=logistic.")
  flags.DEFINE_string("workdir_root", "/tmp/vit_accel_sweep", "Run directories go below this.")
  flags.DEFINE_string("out_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
  flags.DEFINE_string("tag", "", "Suffix of the result files (<report>_<objective>[_tag]).")
  flags.DEFINE_bool("report_only", False, "Rewrite the report from the .jsonl; run nothing.")
  flags.DEFINE_bool("dry_run", False, "Print the runs still to do; run nothing.")


def runner_from_flags():
  """The Runner the shared flags (define_flags) describe."""
  from absl import flags
  f = flags.FLAGS
  return Runner(f.objective, f.config_arg, f.workdir_root, f.tag, tuple(f.extra))


# The arms whose schedule a measurement chooses (a pilot's search, an online schedule).
MEASURED = ("pilot", "online")


# Rules versions whose runs that measured nothing (the prior, unmeasured) ran what this code's
# rules run: versions 3 and 4 changed only what measurements decide, not when measuring is skipped;
# version 5 skips the online schedule's measurements in more cases, and what a skipped run runs
# (the prior at the segment starts) is unchanged.
UNMEASURED_SAME_AS = {2: 5, 3: 5, 4: 5}
# Rules versions whose measured runs of a schedule chose by this code's rules: version 5 changed
# only the online schedule.
MEASURED_SAME_AS = {"pilot": {4: 5}}


def measured_nothing(record: dict) -> bool:
  """Whether a measured arm's run ran its prior without measuring: a pilot of no rounds, or an
  online run whose every decision was the prior's, unmeasured."""
  if record["schedule"] == "pilot":
    return record.get("pilot_rounds") == 0
  decisions = [w for w in record.get("why", []) if w.startswith("at ")]
  return bool(decisions) and all("unmeasured" in w for w in decisions)


def same_rules(record: dict) -> bool:
  """Whether a finished record of a measured arm chose by this code's rules (records before the
  version was kept: version 1; a run of an older version that measured nothing, where that version
  skipped measuring as this one does: UNMEASURED_SAME_AS; a run of an older version whose rules
  for its schedule are this one's: MEASURED_SAME_AS); always True for a fixed schedule."""
  if record["schedule"] not in MEASURED:
    return True
  version = record.get("rules_version", 1)
  if MEASURED_SAME_AS.get(record["schedule"], {}).get(version) == RULES_VERSION:
    return True
  return version == RULES_VERSION or (UNMEASURED_SAME_AS.get(version) == RULES_VERSION
                                      and measured_nothing(record))


def check_rules_version(workdir: str, schedule: str) -> None:
  """A measured arm's workdir holds what was measured and chosen under the rules of one version:
  a new one gets this code's (WORKDIR/rules_version); resuming one of other rules for `schedule`
  (or of before the file was written) would reuse their choices under this version's name, so it
  is refused with an error line (a version whose rules for `schedule` are this code's,
  MEASURED_SAME_AS, resumes)."""
  marker = os.path.join(workdir, "rules_version")
  if os.path.isdir(workdir) and os.listdir(workdir):
    saved = open(marker).read().strip() if os.path.exists(marker) else "1"
    same = {str(v) for v, now in MEASURED_SAME_AS.get(schedule, {}).items()
            if now == RULES_VERSION}
    if saved != str(RULES_VERSION) and saved not in same:
      raise SystemExit(f"error: {workdir} holds a run chosen under schedule rules version "
                       f"{saved}, this code's are version {RULES_VERSION}; move it away or use "
                       f"another --workdir_root")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(marker, "w") as f:
    f.write(f"{RULES_VERSION}\n")


def run_key(arm: str, budget: float, lr: float, batch: int, seed: int) -> str:
  """The run's name: its workdir below the runner's and its key in the .jsonl."""
  return f"{arm}_b{budget:g}_lr{lr:g}_bs{batch}_s{seed}"


def check_warm_start(workdir: str, pilot: dict, overrides: dict) -> None:
  """SystemExit (one `error:` line) when the pilot kept in `workdir` (its pilot_cost.json, `pilot`)
  ran with another pilot.warm_start than the arm's `overrides` ask for (default False): resuming
  it would record a searched run from random weights as warm-started, or the reverse."""
  warm = str(overrides.get("pilot.warm_start", False)).strip().lower() in ("true", "1")
  kept = pilot.get("warm_start", bool(pilot.get("init_workdir")))   # older files: its source
  if kept != warm:
    raise SystemExit(f"error: {workdir} holds a pilot of pilot.warm_start={kept}, this arm asks "
                     f"for {warm}; give the arm another name or another --workdir_root")


@dataclasses.dataclass(frozen=True)
class Runner:
  """Runs one objective's recipe (configs/fmnist_<objective>.py[:config_arg]) with `extra`
  ('key=value' --config overrides) added to every run; workdirs below
  workdir_root/<objective>[_tag]."""
  objective: str
  config_arg: str = ""
  workdir_root: str = "/tmp/vit_accel_sweep"
  tag: str = ""
  extra: tuple[str, ...] = ()

  @property
  def recipe_path(self) -> str:
    path = os.path.join(ROOT, "configs", f"fmnist_{self.objective}.py")
    if not os.path.exists(path):
      raise SystemExit(f"error: no recipe {path} for --objective={self.objective}")
    return path

  def recipe_config(self):
    """The recipe's config as main.py would build it (before --config overrides)."""
    spec = importlib.util.spec_from_file_location("recipe", self.recipe_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(self.config_arg or None)

  def workdir(self, key: str) -> str:
    return os.path.join(self.workdir_root, self.objective + (f"_{self.tag}" if self.tag else ""),
                        key)

  def run(self, arm: str, schedule: str, budget: float, lr: float, batch: int,
          seed: int, overrides: tuple[str, ...] = ()) -> dict:
    """Trains (or resumes) one run and returns its record. `schedule`: a preset, a stage string,
    a schedule file, 'recipe' (the config's own) or 'pilot' (--mode=pilot, then its searched
    schedule on the budget the pilot left: the pilot's units and wall-clock count in the run's).
    `overrides`: 'key=value' items for this run only, after `extra` (the record's `extra` lists
    both)."""
    workdir = self.workdir(run_key(arm, budget, lr, batch, seed))
    common = {"budget_epochs": budget, "optim.base_lr": lr, "batch_size": batch, "seed": seed,
              "eval.every_steps": 0, "eval.at_start": False, "eval.at_progress": "()",
              "checkpoint.at_progress": "()", **PROTOCOL}
    for item in self.extra + tuple(overrides):
      key, _, value = item.partition("=")
      common[key] = value
    t0 = time.time()
    code = commit()   # the code that runs (a commit made while it trains is not it)
    if schedule in MEASURED:
      check_rules_version(workdir, schedule)
    pilot = None
    if schedule == "pilot":
      # The paper's procedure at equal total budget: --mode=pilot (uncompressed pilot run, gradient
      # error at its milestones, search), then the searched schedule on what the pilot left.
      if not os.path.exists(os.path.join(workdir, "pilot_cost.json")):  # done once, kept on resume
        self.main_py(workdir, {k: v for k, v in common.items() if k != "checkpoint.at_progress"},
                     mode="pilot")
      with open(os.path.join(workdir, "pilot_cost.json")) as f:
        pilot = json.load(f)
      check_warm_start(workdir, pilot, common)
      if pilot["remaining_units"] <= 0:
        raise SystemExit(f"error: at {budget:g} epochs the pilot spends {pilot['fraction']:.0%} "
                         f"of the budget, leaving nothing for the searched run; drop this budget "
                         f"or lower pilot.budget_fraction / pilot.measure_fraction (--extra)")
      if pilot.get("measured", True):
        with open(os.path.join(workdir, "pilot", "grad_error.json")) as f:
          measured = json.load(f)
        pilot["measure"] = {k: measured[k]
                            for k in ("reference_batches", "batches", "max_rounds")}
        pilot_train = [m for m in read_metrics(os.path.join(workdir, "pilot"), kind="eval")
                       if "evaluated_by" not in m][-1]
        pilot["wall_s"] = pilot_train["train_wall_s"] + measured["seconds"]
      else:   # the budget could not pay for measurements able to displace the prior
        pilot["wall_s"] = 0.0
      run_dir = os.path.join(workdir, "run")
      chosen = {"schedule_file": os.path.join(workdir, "schedule.txt"),
                "budget": pilot["remaining_units"]}
      if pilot.get("init_workdir"):   # pilot.warm_start: from the pilot's final weights
        chosen["init.workdir"] = pilot["init_workdir"]
    else:
      run_dir = workdir
      chosen = ({} if schedule == "recipe" else
                {"schedule_file": os.path.abspath(schedule)} if os.path.isfile(schedule) else
                {"schedule": schedule})
    self.main_py(run_dir, {**common, **chosen})   # the pilot's budget and source win
    final = [m for m in read_metrics(run_dir, kind="eval") if "evaluated_by" not in m][-1]
    with open(os.path.join(run_dir, "plan.json")) as f:
      plan = json.load(f)
    extra = {"why": schedule_reasons(workdir, run_dir)}
    if schedule in MEASURED:   # what it chose depends on the rules of the code that chose
      extra["rules_version"] = RULES_VERSION
    if pilot is not None:   # the pilot's spending counts in the arm's budget and wall-clock
      final = dict(final, budget_units=final["budget_units"] + pilot["total_units"],
                   train_wall_s=final["train_wall_s"] + pilot["wall_s"])
      extra.update(pilot_units=pilot["total_units"], pilot_wall_s=pilot["wall_s"],
                   pilot_fraction=pilot["fraction"], pilot_rounds=pilot["rounds"],
                   pilot_measure=pilot["measure"],
                   # batches a displacement needed, where the pilot could not afford them
                   pilot_needed=None if pilot.get("measured", True) else pilot["needed_batches"])
    return {"key": run_key(arm, budget, lr, batch, seed), "arm": arm, "schedule": schedule,
            "budget_epochs": budget, "base_lr": lr, "batch_size": batch, "seed": seed,
            "final_knn": final["knn_top1"], "final_linear": final.get("linear_top1"),
            "train_wall_s": final["train_wall_s"], "budget_units": final["budget_units"],
            "input_wait_s": final.get("input_wait_s"),
            "steps": final["step"], "stages": [f"{s['spec']} x{s['num_steps']}"
                                              for s in plan["stages"]],
            "command_wall_s": time.time() - t0, "load_avg_1m": os.getloadavg()[0],
            "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "commit": code,
            "extra": list(self.extra) + list(overrides), **extra}

  def main_py(self, workdir: str, overrides: dict, mode: str = "train") -> None:
    """Runs main.py on the recipe (resuming whatever `workdir` holds) with --config overrides."""
    config = self.recipe_path + (f":{self.config_arg}" if self.config_arg else "")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}",
           f"--workdir={workdir}", f"--mode={mode}"] + [f"--config.{k}={v}"
                                                       for k, v in overrides.items()]
    print("$ " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc:   # its own error line is above; the sweep stops, finished runs stay in the .jsonl
      raise SystemExit(f"error: main.py --mode={mode} exited with status {rc} on {workdir}")

  def wait_while_paused(self) -> None:
    """Holds the next run while WORKDIR_ROOT/PAUSE exists: a timing benchmark needs the machine to
    itself, and two jobs on a few cores slow each other (finished runs' wall-clock stays clean)."""
    pause = os.path.join(self.workdir_root, "PAUSE")
    if os.path.exists(pause):
      print(f"paused: {pause} exists; the next run starts when it is removed", flush=True)
    while os.path.exists(pause):
      time.sleep(10)


def parse_arms(items: list[str]) -> list[tuple[str, str]]:
  """--arms' NAME=SCHEDULE items -> [(name, schedule)]; SystemExit with an error line otherwise."""
  arms = []
  for item in items:
    name, sep, schedule = item.partition("=")
    if not sep or not name or not schedule:
      raise SystemExit(f"error: --arms wants NAME=SCHEDULE pairs, got {item!r}")
    arms.append((name, schedule))
  return arms


def schedule_reasons(workdir: str, run_dir: str) -> list[str]:
  """Why the run's schedule is what it is, where a measurement chose it: a searched schedule's
  reasons (WORKDIR/schedule.json, one line per analysed checkpoint) or an online run's decisions
  (its `online` metrics lines); [] for a fixed schedule."""
  path = os.path.join(workdir, "schedule.json")
  if os.path.exists(path):
    with open(path) as f:
      return [line for stage in json.load(f)["stages"] for line in stage["why"]]
  return [m["online_why"] for m in read_metrics(run_dir, kind="online") if "online_why" in m]


def machine() -> str:
  return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}"


def commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def load(path: str) -> list[dict]:
  """The records of a .jsonl ([] when it does not exist yet)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append(path: str, record: dict) -> None:
  """Appends one record durably (a crash after this line keeps it)."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def cpu_shared(record: dict) -> bool:
  """Whether the run's wall-clock is inflated by other work on the machine: marked so in its record
  (`cpu_shared`, set by hand where that is known), or a 1-minute load average at its end of 2.5
  or more (a lone run on 2 cores shows ~2)."""
  return bool(record.get("cpu_shared")) or record.get("load_avg_1m", 0.0) >= 2.5


def wall(record: dict) -> str:
  """The run's training wall-clock, starred when the machine was shared."""
  return f"{record['train_wall_s']:.0f} s" + ("*" if cpu_shared(record) else "")


def shared_legend(records, *, derived: bool = False) -> list[str]:
  """The Markdown footnote for the walls `wall` stars: `["", text]` when any of `records` ran on a
  shared machine (`cpu_shared`), else `[]`. `derived`: the starred figures are speed-ups read from
  several runs (one shared run is enough to star them; the budget speed-up is exact)."""
  if not any(cpu_shared(r) for r in records):
    return []
  return ["", "\\* wall-clock inflated: the machine was shared with other work during this run"
          + (" (or one of the runs the figure is read from)" if derived else "")
          + ": marked in the record, or a 1-minute load average of 2.5 or more at its end. "
          "Budgets and accuracies do not depend on it (a run's numbers are the same alone or "
          "shared)." + (" The budget speed-up is the exact one." if derived else "")]
