"""Where in the network a compression's gradient error sits: bias^2 and cosine per parameter group.

  python bench/grad_error_by_group.py --workdir=RUN [--steps=19,113] [--metric=euclidean|adam]
      [--reference_batches=8] [--batches=12] [--out=bench/results/...md] [--label=TEXT]

`--mode=grad_error` gives one number per strategy for the whole parameter vector. This splits the
same quantities by parameter group (patch and position embeddings, CLS token, the blocks'
attention and MLP weights, the norms, the objective's heads), to see whether a strategy's bias is the whole network pointing
elsewhere or a few parameters (say, the patch embedding that flexible patch scaling resizes). RUN is a run directory with checkpoints and its
config.json (a pilot's WORKDIR/pilot); the batches are the ones the run would have trained on next,
as --mode=grad_error takes them. Per group: bias^2 (noise-corrected as in vit_accel/grad_error.py)
and the group's share of ||g*||^2, both divided by the whole ||g*||^2 (so the groups' bias^2 sum to
the strategy's), and the cosine between the group's mean compressed gradient and g*. Single host.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from input_pipeline import streams  # noqa: E402
from vit_accel import grad_error, io, rng_streams, run_setup, step_plan  # noqa: E402
from vit_accel.errors import UserError  # noqa: E402
from vit_accel.modes import grad_error as grad_error_mode  # noqa: E402

flags.DEFINE_string("workdir", None, "run directory with checkpoints and config.json")
flags.DEFINE_list("steps", [], "checkpoint steps (default: the milestones, as --mode=grad_error)")
flags.DEFINE_enum("metric", "euclidean", grad_error.METRICS, "grad_error.metric")
flags.DEFINE_integer("reference_batches", 8, "R: uncompressed batches for g*")
flags.DEFINE_integer("batches", 12, "M: batches per candidate (the same for every candidate)")
flags.DEFINE_list("candidates", [], "strategies (default: the run's grad_error.candidates)")
flags.DEFINE_string("out", "", "markdown file to write (default: print only)")
flags.DEFINE_string("label", "", "what the run is, for the file's title (default: --workdir)")
FLAGS = flags.FLAGS


def group_of(path: tuple[str, ...]) -> str:
  """A parameter's group from its path in the params tree: patch_embed, pos_embed, cls_token (the
  first two are what flexible patch scaling resizes), attention and mlp (over every block), norms,
  heads (the objective's)."""
  if path[0] != "backbone":
    return "heads"
  if path[1].startswith("block"):
    return {"attn": "attention", "mlp": "mlp"}.get(path[2], "norms")
  if path[1] in ("patch_embed", "pos_embed", "cls_token"):
    return path[1]
  return "norms"


def group_slices(params) -> dict[str, np.ndarray]:
  """group -> indices into ravel_pytree(params) (whose order is the tree's flatten order)."""
  out, offset = {}, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(str(getattr(p, "key", p)) for p in path)
    out.setdefault(group_of(names), []).append(np.arange(offset, offset + leaf.size))
    offset += leaf.size
  return {g: np.concatenate(v) for g, v in out.items()}


def group_terms(ref: np.ndarray, cand: np.ndarray, groups: dict) -> dict:
  """ref [R, P], cand [M, P] (float64) -> {group: (bias2, share, cosine)}: grad_error.gram_terms
  on the group's coordinates (bias2 noise-corrected, before clipping at 0, so the groups' sum is
  the whole vector's), bias2 and share rescaled to the whole ||g*||^2. A group with ||g*|| = 0 (no
  gradient there yet, e.g. DINO's frozen last layer) has share 0 and no bias2 or cosine: nan."""
  w = np.full((1, len(ref)), 1.0 / len(ref))
  v = np.full((1, len(cand)), 1.0 / len(cand))
  g_star = ref.mean(0)
  norm2 = float(g_star @ g_star)
  out = {}
  for name, idx in groups.items():
    r, c = ref[:, idx], cand[:, idx]
    share = float(g_star[idx] @ g_star[idx]) / norm2
    if share == 0.0:
      out[name] = (float("nan"), 0.0, float("nan"))
      continue
    t = grad_error.gram_terms(r @ r.T, c @ c.T, c @ r.T, w, v, 1.0)
    out[name] = (float(t["bias2_raw"][0]) * share, share, float(t["cosine"][0]))
  whole = grad_error.gram_terms(ref @ ref.T, cand @ cand.T, cand @ ref.T, w, v, 1.0)
  out["all"] = (float(whole["bias2_raw"][0]), 1.0, float(whole["cosine"][0]))
  return out


def main(argv):
  del argv
  if not FLAGS.workdir or not os.path.exists(os.path.join(FLAGS.workdir, "config.json")):
    raise UserError(f"--workdir={FLAGS.workdir!r} has no config.json: give a run directory")
  with open(os.path.join(FLAGS.workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if FLAGS.candidates:
    config.grad_error.candidates = tuple(FLAGS.candidates)
  config.grad_error.steps = tuple(int(s) for s in FLAGS.steps)
  available = grad_error_mode.saved_steps(FLAGS.workdir)
  steps = grad_error_mode.steps_to_analyse(config, FLAGS.workdir, available)
  setup = run_setup.build(config, splits=("train",))
  strategies = step_plan.candidates(config, "grad_error.candidates")
  fns = grad_error.make_grad_fns(config, setup.model, strategies, setup.state_shardings,
                                 setup.mesh)
  r, m = FLAGS.reference_batches, FLAGS.batches
  lines = [f"# Gradient error by parameter group: {FLAGS.label or FLAGS.workdir}", "",
           f"Written by `python bench/grad_error_by_group.py {' '.join(sys.argv[1:])}`.", "",
           f"Metric {FLAGS.metric}; R = {r} reference batches, M = {m} per candidate, batch "
           f"{config.batch_size}. Cells: bias^2 / ||g*||^2 (cosine with g*); the group's share of "
           f"||g*||^2 in the header.", ""]
  for step in steps:
    state = grad_error_mode.restore(available[step], step, setup.restore_target)
    scale = (grad_error.adam_scale(config, state.opt_state, setup.mesh)
             if FLAGS.metric == "adam" else None)
    batches = streams.global_batches(setup.train_source, config, setup.host_shard, setup.mesh,
                                     start_step=step)
    chunk = [next(batches) for _ in range(r + m)]
    progress = np.float32(setup.plan.progress_at(step))
    # The token-keep draws --mode=grad_error makes at this step.
    rng = jax.random.fold_in(jax.random.key(config.seed), rng_streams.GRAD_ERROR + step)

    def gradients(st, part, offset, state=state, progress=progress, scale=scale, rng=rng):
      return grad_error.batch_gradients(fns[st], state, part, rng, offset, progress,
                                        scale).astype(np.float64)

    ref = gradients(strategies[0], chunk[:r], 0)
    groups = group_slices(jax.device_get(state.params))
    table = {st.spec: group_terms(ref, gradients(st, chunk[r:], r), groups)
             for st in strategies[1:]}
    names = list(next(iter(table.values())))
    shares = next(iter(table.values()))
    lines += [f"## step {step} ({100 * float(progress):.0f}% of the budget)", "",
              "| strategy | " + " | ".join(f"{n} ({shares[n][1]:.2f})" for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    for spec, terms in table.items():
      lines.append(f"| {spec} | " + " | ".join(f"{terms[n][0]:.3f} ({terms[n][2]:.2f})"
                                              for n in names) + " |")
    lines.append("")
    print("\n".join(lines[-len(table) - 5:]), flush=True)
  if FLAGS.out:
    io.atomic_write_text(FLAGS.out, "\n".join(lines))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  try:
    app.run(main)
  except UserError as e:
    sys.exit(f"error: {e}")
