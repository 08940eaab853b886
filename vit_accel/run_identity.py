"""Run identity: what a checkpoint must agree with before this config may resume it.

A checkpoint's metadata records the run's identity: every config key except the ones that only say
how, where or when the run executes (`FREE`: schedule and budget, evaluation, checkpointing, mesh,
logging, file locations, the compute dtype, the optimiser's hyperparameters), plus a fingerprint of
the training data (input_pipeline/fingerprint.py). Being a deny-list, a key added to the config
later is part of the identity without anyone listing it. The train state's shapes are checked
separately, against the checkpoint's own array metadata (checkpointing.Checkpointer:
check_compatible, and restore_latest_good on resume).

On resume, the first differing key is one `UserError` line naming the key, both values and the fix.
`allow_schedule_change` lets the step plan (schedule, budget) change; never the identity.
"""
from __future__ import annotations

import json

from absl import logging

from vit_accel import objectives, schedule_search
from vit_accel.config_domains import flatten
from vit_accel.errors import UserError

# The TrainState's layout; bumped when its fields change, so an old checkpoint is refused with one
# line instead of failing to restore. 2: ema_params + extra (objective-generic) replaced MoCo's
# key_params.
STATE_FORMAT = 2

# Keys (or whole sections, by prefix) that may differ between a checkpoint and the config resuming
# it. Everything else shapes the train state or the data stream.
FREE = (
    "schedule", "schedule_file", "budget", "budget_epochs", "allow_schedule_change",  # the plan
    "compile_cache_dir", "xla_cpu_flags", "stop_at_step", "log_every_steps",
    "preemption_check_every_steps",
    "tensorboard", "compression.", "grad_error.", "search.", "online.", "pilot.",
    "optim.",           # learning rate, decay, clipping: a resumed run may change them on purpose
    "model.dtype",      # compute dtype only: parameters are float32 either way
    "model.attention", "model.attention_pad_to",   # how attention is computed, not what
    "model.remat",      # what the backward pass recomputes instead of storing: same gradients
    "data.dir", "data.prefetch", "data.shuffle_buffer", "data.verify_images", "data.bad_images",
    "distributed.", "mesh.", "checkpoint.", "eval.", "export.",
    "finetune.",        # --mode=finetune's own recipe: pretraining never reads it
)
# Not free: `init.*` (where a fresh run's weights came from). A resume never reads the source (it
# may be gone), but one naming another source is another run, refused as such.


def _free(key: str) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def identity(config, data_fingerprint: dict) -> dict:
  """{dotted config key: value} of everything that is not FREE, plus `data_fingerprint.<key>`;
  JSON-normalised (tuples -> lists), as it reads back from a checkpoint."""
  # Other objectives' sections are not this run's (a recipe may carry one it does not read).
  unused = tuple(f"{name}." for name in objectives.OBJECTIVES if name != config.objective)
  flat = {k: v for k, v in flatten(config.to_dict()).items()
          if not _free(k) and not k.startswith(unused)}
  flat.update({f"data_fingerprint.{k}": v for k, v in data_fingerprint.items()})
  return json.loads(json.dumps(flat))


# The keys outside `online.` by which an online schedule decides (vit_accel/online.py): a resumed
# online run takes its remaining decisions by the rules it started with.
ONLINE_RULES = ("search.final_full", "search.monotone", "search.tie_tolerance", "search.prior",
                "grad_error.bootstrap", "grad_error.ci_level", "grad_error.metric")


# The value an ONLINE_RULES key had in effect before it existed (an online checkpoint saved then
# lacks it): search.prior '' = no prior; grad_error.metric the paper's, "euclidean"; `version`
# (schedule_search.RULES_VERSION, not a config key) 1.
RULES_BEFORE_THEIR_KEY = {"search.prior": "", "grad_error.metric": "euclidean", "version": 1}


def run_metadata(config, plan, data_fingerprint: dict, online: bool) -> dict:
  """The metadata saved with every checkpoint: format, identity, and the step plan (for an online
  schedule, how it decides - `online.*` and ONLINE_RULES: its plan grows with its decisions, which
  are saved beside it)."""
  flat = flatten(config.to_dict())
  rules = {**{k: flat[k] for k in ONLINE_RULES}, "version": schedule_search.RULES_VERSION}
  plan_key = ({"online": config.online.to_dict(), "rules": rules, "budget": plan.budget}
              if online else plan.to_dict())
  meta = {"state_format": STATE_FORMAT, "run": identity(config, data_fingerprint),
          "plan": plan_key}
  return json.loads(json.dumps(meta))


def _legacy_identity(saved: dict) -> dict:
  """Checkpoints written before `run` existed recorded objective, model, batch_size and seed."""
  old = {k: saved[k] for k in ("objective", "model", "batch_size", "seed") if k in saved}
  return flatten(old)


def first_difference(saved: dict, current: dict):
  """(key, saved value, current value) of the first key present in both flat dicts with different
  values - `objective` first, then `model.*`, then the rest in sorted order, so the most basic
  difference is named; None when they agree. Keys only one side has are skipped (a key added to
  the config after the checkpoint was written)."""
  order = lambda k: (k != "objective", not k.startswith("model."), k)  # noqa: E731
  for key in sorted(saved.keys() & current.keys(), key=order):
    if saved[key] != current[key]:
      return key, saved[key], current[key]
  return None


def _cli(value) -> str:
  """`value` as a --config.key= override takes it, without spaces: (0.2,1.0), 'ema', 64."""
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_cli(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value) if isinstance(value, str) else str(value)


def _short_plan(plan: dict) -> str:
  if "online" in plan:
    return f"online {plan['online']}"
  return "; ".join(f"{s['spec']} x{s['num_steps']}" for s in plan["stages"])


def check_resumable(saved: dict, current: dict, directory: str, allow_schedule_change: bool):
  """Raises UserError (one line) when checkpoint metadata `saved` may not be resumed by a run whose
  metadata is `current` (run_metadata); returns None when it may."""
  if saved.get("state_format", 1) != current["state_format"]:
    raise UserError(f"{directory} holds a checkpoint in train-state format "
                    f"{saved.get('state_format', 1)} (an older vit-accel); this version reads "
                    f"format {current['state_format']}: use a new --workdir")
  diff = first_difference(saved.get("run") or _legacy_identity(saved), current["run"])
  if diff is not None:
    key, was, now = diff
    if key.startswith("data_fingerprint."):
      raise UserError(f"{directory} holds a checkpoint trained on other data ({key}: {was} there, "
                      f"{now} now: images added, removed, resized or moved between classes, or "
                      f"unreadable ones left out); restore that data, or use a new --workdir")
    raise UserError(f"{directory} holds a checkpoint of a run with {key}={was!r}, this config has "
                    f"{key}={now!r}; resume with --config.{key}={_cli(was)} (or restore the "
                    f"recipe), or use a new --workdir")
  if "run" not in saved:
    logging.warning("%s: checkpoint from an older vit-accel, which recorded only the objective, "
                    "model, batch size and seed; the rest of the config and the data are not "
                    "checked (array shapes still are)", directory)
  plan = current["plan"]
  saved_plan = saved.get("plan")
  if saved_plan is not None and "online" in saved_plan:
    if "rules" not in saved_plan:
      plan = {k: v for k, v in plan.items() if k != "rules"}   # saved before rules were recorded
    else:   # a rule added since the checkpoint was saved: how the run decided without it
      saved_plan = {**saved_plan, "rules": {**{k: v for k, v in RULES_BEFORE_THEIR_KEY.items()
                                               if k in plan.get("rules", {})},
                                            **saved_plan["rules"]}}
  if saved_plan is not None and saved_plan != plan and not allow_schedule_change:
    key, was, now = first_difference(flatten(saved_plan), flatten(plan)) or (
        "stages", len(saved_plan.get("stages", [])), len(plan.get("stages", [])))
    raise UserError(f"{directory} holds a checkpoint of a run with step plan "
                    f"[{_short_plan(saved_plan)}], this config plans "
                    f"[{_short_plan(current['plan'])}] (step plan's {key}: {_cli(was)} there, "
                    f"{_cli(now)} now); "
                    + ("finish it with the vit-accel that started it (its decision rules "
                       "differ from this version's)" if key == "rules.version" else
                       f"resume with --config.{key[len('rules.'):]}={_cli(was)}"
                       if key.startswith("rules.") else "restore schedule/budget")
                    + ", use a new --workdir, or set "
                    "--config.allow_schedule_change=True to continue with the new plan")
