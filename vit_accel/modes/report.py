"""--mode=report: the plots of WORKDIR (and the --compare runs beside it) into WORKDIR/report/, and
their summary table printed (vit_accel/report.py). Reads metrics.jsonl and plan.json only; needs
neither JAX nor TensorFlow (except for stages.png, which draws the stages' token samples)."""
from __future__ import annotations

import os

from vit_accel import report
from vit_accel.modes import Args


def run(config, workdir: str, args: Args = Args()) -> list[str]:
  """The paths written."""
  runs = [report.load_run(d) for d in [workdir, *args.compare]]
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  written = report.draw_runs(runs, config, out)
  print(report.summary_table(runs))
  print("wrote " + ", ".join(written), flush=True)
  return written
