"""SimCLR and DINO: losses against NumPy references, centring and temperature schedules, which
parameters get gradients, the cost model's branches, config checks, and a short run of each."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from vit_accel import config_checks, objectives, optimizer, step_plan
from vit_accel import sharding as sharding_lib
from vit_accel import state as state_lib
from vit_accel.compression import FULL, BranchStrategies
from vit_accel.errors import UserError
from vit_accel.models.vit import VisionTransformer
from vit_accel.objectives import dino, ema, simclr


def numpy_nt_xent(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2 = z.shape[0]
  n = n2 // 2
  losses = []
  for i in range(n2):
    pos = (i + n) % n2
    sims = np.array([z[i] @ z[j] / t for j in range(n2) if j != i])    # 2N - 1 terms
    losses.append(-(z[i] @ z[pos] / t) + np.log(np.exp(sims).sum()))
  return float(np.mean(losses))


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_numpy(t):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 6, 5))
  got = float(simclr.nt_xent(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), t))
  assert got == pytest.approx(numpy_nt_xent(z1, z2, t), rel=1e-5)
  # Matched pairs score far better than shuffled ones.
  assert float(simclr.nt_xent(z1, z1 + 0.01, 0.2)) < float(simclr.nt_xent(z1, z2, 0.2))


def numpy_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_dino_loss_and_center_update_match_numpy():
  rng = np.random.default_rng(1)
  n, k = 4, 7
  student = [rng.normal(size=(n, k)) for _ in range(5)]     # 2 global + 3 local
  teacher = [rng.normal(size=(n, k)) for _ in range(2)]
  center = rng.normal(size=(k,)) * 0.1
  ts, tt = 0.1, 0.05
  total, pairs = 0.0, 0
  for i, t in enumerate(teacher):
    p = numpy_softmax((t - center) / tt)
    for v, s in enumerate(student):
      if v == i:
        continue
      logq = np.log(numpy_softmax(s / ts))
      total += np.mean(np.sum(-p * logq, axis=-1))
      pairs += 1
  assert pairs == 2 * 5 - 2
  as32 = lambda xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
  got, _ = dino.dino_loss(as32(student), as32(teacher), jnp.asarray(center, jnp.float32), ts, tt)
  assert float(got) == pytest.approx(total / pairs, rel=1e-5)
  new = dino.update_center(jnp.asarray(center, jnp.float32), as32(teacher), 0.9)
  expected = 0.9 * center + 0.1 * np.concatenate(teacher).mean(0)
  np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-5, atol=1e-7)


def numpy_sinkhorn_knopp(logits, temp, iterations=3):
  q = np.exp(logits.astype(np.float64) / temp).T      # [K, B], as DINOv2 writes it
  q /= q.sum()
  k, b = q.shape
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def test_dino_sinkhorn_centering_matches_numpy_and_balances_the_batch():
  rng = np.random.default_rng(2)
  n, k = 6, 5
  teacher = [rng.normal(size=(n, k)) + np.arange(k) for _ in range(2)]   # prototype 4 favoured
  student = [rng.normal(size=(n, k)) for _ in range(3)]
  tt, ts = 0.5, 0.1
  targets = numpy_sinkhorn_knopp(np.concatenate(teacher), tt)
  got = dino.teacher_targets([jnp.asarray(t, jnp.float32) for t in teacher], jnp.zeros((k,)), tt,
                             "sinkhorn")
  np.testing.assert_allclose(np.concatenate([np.asarray(g) for g in got]), targets, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
  # The batch's mass is spread near-evenly over the prototypes; plain softmax piles it on the last.
  assert np.ptp(targets.sum(0)) < 0.2 * np.ptp(numpy_softmax(np.concatenate(teacher) / tt).sum(0))
  # The loss uses those targets: pairs v != i as with the EMA centre.
  total = sum(np.mean(np.sum(-targets[i * n:(i + 1) * n] * np.log(numpy_softmax(s / ts)), -1))
              for i in range(2) for v, s in enumerate(student) if v != i)
  as32 = lambda xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
  loss, _ = dino.dino_loss(as32(student), as32(teacher), jnp.zeros((k,)), ts, tt, "sinkhorn")
  assert float(loss) == pytest.approx(total / (2 * 3 - 2), rel=1e-4)


def numpy_koleo(x):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  np.fill_diagonal(d, np.inf)
  return float(-np.log(d.min(1)).mean())


@pytest.mark.slow
def test_dino_koleo_matches_numpy_and_adds_to_the_loss_only_when_asked():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(10, 6))
  assert float(dino.koleo_loss(jnp.asarray(x, jnp.float32))) == pytest.approx(numpy_koleo(x),
                                                                              rel=1e-5)
  # Spread-out features score lower than a batch with two near-duplicates.
  close = x.copy()
  close[1] = close[0] + 1e-3
  assert numpy_koleo(close) > numpy_koleo(x)
  assert float(dino.koleo_loss(jnp.asarray(close, jnp.float32))) > float(
      dino.koleo_loss(jnp.asarray(x, jnp.float32)))
  # In the DINO loss: + weight x (one KoLeo term per global view, on the student's CLS features).
  model = dino.DINOModel(tiny_backbone(), dino.DINOHead(out_dim=32, hidden_dim=16,
                                                        bottleneck_dim=8))
  g = [jax.random.normal(jax.random.key(i), (6, 8, 8, 3)) for i in range(2)]
  local = [jax.random.normal(jax.random.key(5), (6, 4, 4, 3))]
  params = model.init(jax.random.key(1), g[0])["params"]
  teacher = ema.init(params, dino.EMA_PARTS)

  def loss(weight):
    return float(dino.loss_fn(model, params, teacher, jnp.zeros((32,)), g, local,
                              student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
                              koleo_weight=weight)[0])

  features = [np.asarray(model.apply({"params": params}, v, method=dino.DINOModel.features),
                         np.float64) for v in g]
  expected = sum(numpy_koleo(f) for f in features)
  assert loss(0.1) - loss(0.0) == pytest.approx(0.1 * expected, rel=1e-3)
  c = tiny_config(recipe="dino")
  c.dino.koleo_weight = -0.1
  with pytest.raises(UserError,
                     match=r"dino.koleo_weight=-0.1 is out of range: must be a number >= 0"):
    config_checks.validate_config(c)


def test_dino_teacher_temperature_warms_up_then_holds():
  at = lambda p: float(dino.teacher_temp_at(p, 0.04, 0.07, 0.3))  # noqa: E731
  assert at(0.0) == pytest.approx(0.04)
  assert at(0.15) == pytest.approx(0.055)
  assert at(0.3) == pytest.approx(0.07) and at(0.9) == pytest.approx(0.07)
  assert float(dino.teacher_temp_at(0.0, 0.04, 0.07, 0.0)) == pytest.approx(0.07)
  assert float(ema.momentum_at(0.0, 0.996)) == pytest.approx(0.996)
  assert float(ema.momentum_at(1.0, 0.996)) == pytest.approx(1.0)
  # A short run's teacher may stop short of 1, so it keeps following the student to the end.
  assert float(ema.momentum_at(0.5, 0.95, 0.99)) == pytest.approx(0.97)
  assert float(ema.momentum_at(1.0, 0.95, 0.99)) == pytest.approx(0.99)


def tiny_backbone():
  return VisionTransformer(width=16, depth=1, num_heads=2, patch_size=4, image_size=8)


def grad_mass(tree):
  return float(jax.tree.reduce(lambda a, b: a + jnp.abs(b).sum(), tree, 0.0))


@pytest.mark.slow
def test_dino_gradients_reach_the_student_only_and_local_crops_have_their_own_length():
  model = dino.DINOModel(tiny_backbone(), dino.DINOHead(out_dim=32, hidden_dim=16,
                                                        bottleneck_dim=8))
  g = [jax.random.normal(jax.random.key(i), (4, 8, 8, 3)) for i in range(2)]
  local = [jax.random.normal(jax.random.key(5), (4, 4, 4, 3))]   # 1 patch per side
  params = model.init(jax.random.key(1), g[0])["params"]
  teacher = ema.init(params, dino.EMA_PARTS)
  center = jnp.zeros((32,))

  def loss(p, t, freeze=False):
    return dino.loss_fn(model, p, t, center, g, local, student_temp=0.1, teacher_temp=0.04,
                        center_momentum=0.9, freeze_last=freeze)[0]

  assert grad_mass(jax.jit(jax.grad(loss))(params, teacher)) > 0
  assert grad_mass(jax.jit(jax.grad(lambda t: loss(params, t)))(teacher)) == 0
  # Frozen last layer: no gradient into it, the rest still learns.
  frozen = jax.jit(jax.grad(lambda p: loss(p, teacher, True)))(params)
  assert grad_mass(frozen["head"]["last_v"]) == 0 and grad_mass(frozen["backbone"]) > 0
  # Weight-normalised last layer: rescaling an output unit's weight vector changes nothing.
  out = model.apply({"params": params}, g[0])
  scaled = jax.tree.map(lambda x: x, params)
  scaled["head"]["last_v"] = params["head"]["last_v"] * jnp.linspace(0.5, 3.0, 32)
  assert out.shape == (4, 32)
  np.testing.assert_allclose(np.asarray(model.apply({"params": scaled}, g[0])), np.asarray(out),
                             rtol=1e-4, atol=1e-5)


def test_dino_head_batchnorm_sees_every_view_as_dinos_multicrop_wrapper_does():
  model = dino.DINOModel(tiny_backbone(), dino.DINOHead(out_dim=32, hidden_dim=16,
                                                        bottleneck_dim=8, use_bn=True))
  g = [jax.random.normal(jax.random.key(i), (4, 8, 8, 3)) for i in range(2)]
  local = jax.random.normal(jax.random.key(5), (4, 4, 4, 3))
  params = model.init(jax.random.key(1), g[0])["params"]

  def outputs(views, joint):
    return model.apply({"params": params}, views, FULL, [None] * len(views), joint_head=joint,
                       method=dino.DINOModel.forward_views)[0]

  joint = outputs((g[0], g[1], local), True)
  # One head call on the concatenated features: the same as applying the head to them directly.
  features = jnp.concatenate([model.apply({"params": params}, v, method=dino.DINOModel.features)
                              for v in (g[0], g[1], local)])
  direct = model.apply({"params": params}, features, method=lambda m, f: m.head(f))
  np.testing.assert_allclose(np.asarray(jnp.concatenate(joint)), np.asarray(direct), rtol=1e-4,
                             atol=1e-5)
  # Joint: a view's output depends on the other views (shared batch statistics); per view: not.
  other = (g[0], g[1] * 3.0 + 1.0, local)
  assert not np.allclose(np.asarray(outputs(other, True)[0]), np.asarray(joint[0]), atol=1e-4)
  np.testing.assert_allclose(np.asarray(outputs(other, False)[0]),
                             np.asarray(outputs((g[0], g[1], local), False)[0]), rtol=1e-5)
  per_view = outputs((g[0], g[1], local), False)
  np.testing.assert_allclose(np.asarray(per_view[0]), np.asarray(model.apply({"params": params},
                                                                               g[0])), rtol=1e-5)
  d = tiny_config(recipe="dino")
  d.dino.head_batch = "per_crop"
  with pytest.raises(UserError,
                     match="dino.head_batch='per_crop' is out of range: must be one of "
                           "'per_view', 'all_views'"):
    config_checks.validate_config(d)


def test_simclr_gradients_flow_through_both_views():
  model = simclr.SimCLRModel(tiny_backbone(), proj_hidden_dim=16, out_dim=8)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  y = jax.random.normal(jax.random.key(3), (6, 8, 8, 3))
  params = model.init(jax.random.key(1), x)["params"]
  # Each view on its own path: the loss depends on both, with gradients through each.
  gx = jax.jit(jax.grad(lambda v: simclr.loss_fn(model, params, (v, y), 0.2)))(x)
  gy = jax.jit(jax.grad(lambda v: simclr.loss_fn(model, params, (x, v), 0.2)))(y)
  assert float(jnp.abs(gx).sum()) > 0 and float(jnp.abs(gy).sum()) > 0


def test_cost_branches_count_views_and_local_crops():
  s = tiny_config(recipe="simclr")
  d = tiny_config(recipe="dino")
  full = BranchStrategies.parse("full")
  # SimCLR: two views with gradient (3 forwards each) + projector.
  assert step_plan.step_cost_units(s, full) == pytest.approx(6.0, rel=0.1)
  assert len(simclr.cost_branches(s, full)) == 2
  branches = dino.cost_branches(d, full)
  assert len(branches) == 2 + d.aug.local_crops + 2
  assert [b.with_grad for b in branches].count(False) == 2
  local = [b for b in branches if b.layout.seq_len < branches[0].layout.seq_len]
  assert len(local) == d.aug.local_crops
  # Compressing the student lowers the cost; the teacher stays at full length.
  cheap = dino.cost_branches(d, BranchStrategies.parse("keep0.5"))
  assert all(b.layout.seq_len == branches[-1].layout.seq_len for b in cheap if not b.with_grad)
  assert step_plan.step_cost_units(d, BranchStrategies.parse("keep0.5")) < \
      step_plan.step_cost_units(d, full)


def test_dino_branches_each_take_their_own_strategy_and_cost():
  d = tiny_config(recipe="dino")
  cost = lambda spec: step_plan.step_cost_units(d, BranchStrategies.parse(spec))  # noqa: E731
  # Without a third part the local crops run the student's strategy, as an explicit one does.
  assert cost("keep0.5") == pytest.approx(cost("keep0.5|full|keep0.5"))
  # Each part moves only its own branches' cost.
  assert cost("keep0.5|full|full") > cost("keep0.5") > cost("keep0.5|full|patch8")
  assert cost("keep0.5|keep0.5") < cost("keep0.5|full")
  branches = dino.cost_branches(d, BranchStrategies.parse("full|keep0.5|count8"))
  kept = [b.layout.kept for b in branches]
  full_global = branches[0].layout.kept
  assert kept[:2] == [full_global] * 2                               # student, global
  assert kept[2:2 + d.aug.local_crops] == [8] * d.aug.local_crops    # student, local
  assert kept[-2:] == [full_global // 2] * 2                         # teacher


def test_dino_local_crop_count_sets_the_views_costed_and_run():
  d = tiny_config(recipe="dino")
  n = d.aug.local_crops
  assert n >= 2
  cost = lambda spec: step_plan.step_cost_units(d, BranchStrategies.parse(spec))  # noqa: E731
  per_crop = (cost("full") - cost(f"full|full|full,crops{n - 1}"))
  assert per_crop > 0
  assert cost("full|full|full,crops0") == pytest.approx(cost("full") - n * per_crop)
  assert len(dino.cost_branches(d, BranchStrategies.parse("full|full|full,crops1"))) == 2 + 1 + 2
  # More crops than the recipe makes: refused, naming the key and the recipe's count.
  d.grad_error.candidates = (f"full|full|full,crops{n + 1}",)
  with pytest.raises(UserError, match=rf"grad_error.candidates: .*runs {n + 1} local crops, but "
                                      rf"the recipe makes {n} \(aug.local_crops\)"):
    config_checks.validate_config(d)
  # In the loss: crops<N> uses the first N local views, as if only they were given.
  model = dino.DINOModel(tiny_backbone(), dino.DINOHead(out_dim=32, hidden_dim=16,
                                                        bottleneck_dim=8))
  g = [jax.random.normal(jax.random.key(i), (4, 8, 8, 3)) for i in range(2)]
  local = [jax.random.normal(jax.random.key(5 + i), (4, 8, 8, 3)) for i in range(3)]
  params = model.init(jax.random.key(1), g[0])["params"]
  extra = {"center": jnp.zeros((32,))}
  h = d.dino
  h.out_dim = 32

  def loss(spec, locals_given):
    views = {"views": tuple(g), "local_views": tuple(locals_given)}
    return float(dino.loss(model, params, ema.init(params, dino.EMA_PARTS), extra, views, d,
                           BranchStrategies.parse(spec), jax.random.key(7), 0.5)[0])

  assert loss("full|full|full,crops1", local) == loss("full|full|full", local[:1])
  assert loss("full|full|full,crops1", local) != loss("full|full|full", local)
  assert loss("full|full|full,crops0", local) == loss("full|full|full", ())


def test_dino_local_strategy_changes_only_the_local_crops_forward():
  model = dino.DINOModel(tiny_backbone(), dino.DINOHead(out_dim=32, hidden_dim=16,
                                                        bottleneck_dim=8))
  g = [jax.random.normal(jax.random.key(i), (4, 8, 8, 3)) for i in range(2)]
  local = [jax.random.normal(jax.random.key(5), (4, 8, 8, 3))]
  params = model.init(jax.random.key(1), g[0])["params"]
  teacher = ema.init(params, dino.EMA_PARTS)

  def loss(spec):
    return float(dino.loss_fn(model, params, teacher, jnp.zeros((32,)), g, local,
                              student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
                              strategies=BranchStrategies.parse(spec),
                              rng=jax.random.key(7))[0])

  assert loss("patch8") == loss("patch8|full|patch8")   # implicit == explicit local strategy
  assert loss("patch8|full|full") != loss("patch8")     # the local part is used
  assert loss("full|full|patch8") != loss("full")
  outputs = model.apply({"params": params}, tuple(g) + tuple(local), (FULL, FULL, FULL),
                        [None] * 3, method=dino.DINOModel.forward_views)[0]
  again = model.apply({"params": params}, tuple(g) + tuple(local), FULL, [None] * 3,
                      method=dino.DINOModel.forward_views)[0]
  for a, b in zip(outputs, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_local_crop_part_needs_local_crops_that_it_fits():
  m = tiny_config(schedule="0.5:keep0.5|keep0.5|keep0.5; 1:full")
  with pytest.raises(UserError, match=r"schedule: 'keep0.5\|keep0.5\|keep0.5' has a third part "
                                      r"for local crops, but this run has none \(mocov3, "
                                      r"aug.local_crops=0\)"):
    config_checks.validate_config(m)
  # MoCo-v3 never reads local crops, even where a recipe sets some: the part is refused, not ignored.
  m.aug.local_crops, m.aug.local_size = 2, 16
  with pytest.raises(UserError, match=r"but this run has none \(mocov3, aug.local_crops=2\)"):
    config_checks.validate_config(m)
  d = tiny_config(recipe="dino", **{"grad_error.candidates": ("patch8|full|patch32",)})
  with pytest.raises(UserError, match=r"grad_error.candidates: 'patch8\|full\|patch32' on the "
                                      r"16px local crops: .*patch 32 is larger"):
    config_checks.validate_config(d)
  with pytest.raises(UserError, match=re.escape("use 'QUERY', 'QUERY|KEY' or 'QUERY|KEY|LOCAL'")):
    BranchStrategies.parse("full|full|full|full")
  st = BranchStrategies.parse("patch8|keep0.5|full")
  assert (st.query.spec, st.key.spec, st.local.spec, st.spec) == \
      ("patch8", "keep0.5", "full", "patch8|keep0.5|full")
  assert BranchStrategies.parse(st.spec) == st and BranchStrategies.parse("patch8").local is None


def test_objective_config_errors_are_one_line():
  c = tiny_config(recipe="simclr")
  c.objective = "byol"
  with pytest.raises(UserError, match="unknown objective='byol'; available: mocov3, simclr, dino"):
    config_checks.validate_config(c)
  c.objective = "dino"     # no dino section in a SimCLR config
  with pytest.raises(UserError, match="needs a config section 'dino'"):
    config_checks.validate_config(c)
  d = tiny_config(recipe="dino")
  d.aug.local_size = 10    # not a multiple of the patch size 4
  with pytest.raises(UserError, match="aug.local_size=10"):
    config_checks.validate_config(d)
  d = tiny_config(recipe="dino")
  d.dino.centering = "softmax"
  with pytest.raises(UserError, match="dino.centering='softmax' is out of range: must be one of "
                                      "'ema', 'sinkhorn'"):
    config_checks.validate_config(d)
  assert set(objectives.OBJECTIVES) == {"mocov3", "simclr", "dino"}


def test_eval_weights_pick_the_objectives_copy_or_the_one_asked_for():
  state = state_lib.TrainState(step=0, params={"who": "online"}, ema_params={"who": "ema"},
                               extra={}, opt_state=())
  expected = {("dino", ""): "ema", ("dino", "online"): "online", ("mocov3", ""): "online",
              ("mocov3", "ema"): "ema", ("simclr", ""): "online", ("simclr", "online"): "online"}
  for (recipe, weights), who in expected.items():
    c = tiny_config(recipe=recipe)
    c.eval.weights = weights
    config_checks.validate_config(c)
    assert state_lib.eval_params(c, state)["who"] == who, (recipe, weights)
  c = tiny_config(recipe="simclr")
  c.eval.weights = "ema"     # SimCLR keeps no EMA copy
  with pytest.raises(UserError, match="eval.weights='ema': objective simclr keeps no EMA copy"):
    config_checks.validate_config(c)
  c.eval.weights = "teacher"
  with pytest.raises(UserError, match="eval.weights='teacher' is out of range: must be one of '', "
                                      "'online', 'ema'"):
    config_checks.validate_config(c)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simclr", "dino"])
def test_short_run_of_each_objective_logs_knn_and_resumes_identically(objective, tmp_path,
                                                                      needs_fashion_mnist):
  from vit_accel import checkpointing, train
  cfg = tiny_config(steps=4, schedule="0.5:keep0.5; 1:full", recipe=objective)
  result = train.train_and_evaluate(cfg, str(tmp_path / "straight"))
  assert 0.0 <= result["knn_top1"] <= 1.0
  lines = [json.loads(l) for l in open(tmp_path / "straight" / "metrics.jsonl")]
  train_lines = [l for l in lines if "loss" in l]
  assert train_lines and all(np.isfinite(l["loss"]) for l in train_lines)
  assert {l["stage"] for l in train_lines} == {0, 1}
  if objective == "dino":
    assert all(0.0399 <= l["teacher_temp"] <= 0.0701 and l["teacher_entropy"] > 0
               for l in train_lines)
  # Stopped half-way and resumed: the same parameters, EMA and objective state as straight through.
  cfg_stop = tiny_config(steps=4, schedule="0.5:keep0.5; 1:full", recipe=objective)
  cfg_stop.stop_at_step = 2
  train.train_and_evaluate(cfg_stop, str(tmp_path / "resumed"))
  cfg_rest = tiny_config(steps=4, schedule="0.5:keep0.5; 1:full", recipe=objective)
  train.train_and_evaluate(cfg_rest, str(tmp_path / "resumed"))

  def final_state(workdir):
    model = state_lib.build_model(cfg)
    tx = optimizer.make_optimizer(cfg)
    mesh = sharding_lib.make_mesh(cfg)
    _, abstract, shardings = state_lib.state_layout(cfg, model, tx, mesh)
    ck = checkpointing.Checkpointer(f"{workdir}/checkpoints", keep=3, every_steps=1,
                                    async_save=False)
    try:
      state, _ = ck.restore(max(ck.all_steps()),
                            checkpointing.abstract_with_shardings(abstract, shardings))
    finally:
      ck.close()
    return state

  a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
  assert int(a.step) == int(b.step) > 2     # the same plan, finished in both
  for x, y in zip(jax.tree.leaves((a.params, a.ema_params, a.extra)),
                  jax.tree.leaves((b.params, b.ema_params, b.extra))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  if objective == "dino":
    assert float(jnp.abs(a.extra["center"]).sum()) > 0       # the centre moved
    assert set(a.ema_params) == {"backbone", "head"}
  else:
    assert not jax.tree.leaves(a.ema_params) and not jax.tree.leaves(a.extra)   # nothing to carry


def test_ema_per_budget_raises_the_momentum_to_the_step_cost_ratio():
  from vit_accel import run_setup, train_step
  config = tiny_config(recipe="dino")
  cheap = BranchStrategies.parse("patch8|patch8|full", config.compression.bucket)
  assert train_step.ema_exponent(config, cheap) == 1.0   # off by default: the paper's EMA
  config.compression.ema_per_budget = True
  ratio = (step_plan.step_cost_units(config, cheap)
           / step_plan.step_cost_units(config, BranchStrategies()))
  assert 0.2 < ratio < 0.8
  assert train_step.ema_exponent(config, cheap) == ratio
  assert train_step.ema_exponent(config, BranchStrategies()) == 1.0
  # In the step: the logged (and applied) momentum is the schedule's to that power.
  setup = run_setup.build(config, splits=())
  step = jax.jit(train_step.make_train_step(config, setup.model, setup.tx, cheap))
  batch = {name: tuple(np.zeros(shape, np.uint8) for shape in shapes)
           for name, shapes in train_step.batch_shapes(config).items()}
  state, metrics = step(setup.fresh_state(), batch, jnp.float32(0.0))
  want = float(config.dino.base_momentum) ** ratio
  np.testing.assert_allclose(float(metrics["momentum"]), want, rtol=1e-6)
  assert float(metrics["momentum"]) > config.dino.base_momentum
