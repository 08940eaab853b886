"""DINO (Caron et al. 2021): a student (backbone + DINO head) trained to match an EMA teacher's
centred, sharpened output distribution across views.

- Teacher: EMA of the student's backbone + head, momentum cosine from `dino.base_momentum` (0.996)
  to 1; it sees the 2 global views only, uncompressed unless the stage spec says 'QUERY|KEY'.
- Student: all views, the 2 global crops (the stage's 'QUERY' strategy) and `aug.local_crops` local
  crops (their own, smaller side, hence their own sequence length; the spec's third part
  'QUERY|KEY|LOCAL', else the 'QUERY' strategy); a stage may use only the first N local crops,
  'QUERY|KEY|LOCAL,crops<N>' (fewer views per step: cheaper, and other pairs in the loss).
- Loss: cross-entropy H(teacher_i, student_v) averaged over every pair with v != i; teacher softmax at
  a temperature warmed up linearly from `warmup_teacher_temp` to `teacher_temp`, after subtracting a
  centre (EMA of the teacher's batch-mean output, momentum `center_momentum`); student at
  `student_temp`. `centering='sinkhorn'` instead normalises the teacher's logits over the global
  batch with a few Sinkhorn-Knopp iterations (DINOv2's centring): every prototype gets an equal
  share of the batch from the first step, so a short run does not spend its start collapsing onto
  one output and back to uniform, as the EMA centre lets it.
- `dino.koleo_weight` > 0 adds DINOv2's KoLeo regulariser on the student's backbone CLS features
  of each global view: -mean log(distance to the nearest other sample in the batch), which spreads
  the features over the sphere (what kNN retrieval reads) where DINO's loss only clusters them.
  0 (the default) is the 2021 paper's loss.
- Head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised linear to `out_dim` (no bias,
  norm fixed to 1 when `norm_last_layer`); the last layer is frozen for the first
  `freeze_last_layer_fraction` of the budget, as DINO freezes it for its first epoch. It runs on
  each view's batch (`dino.head_batch='per_view'`), so a BatchNorm head (`head_bn`) normalises
  every view on its own; 'all_views' is DINO's wrapper (one call on all views' features), whose
  teacher drifted to a uniform output on the embedded data.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_accel import compression
from vit_accel.compression import FULL, BranchStrategies, Strategy
from vit_accel.models.heads import BatchStatNorm
from vit_accel.models.vit import VisionTransformer, gelu
from vit_accel.objectives import ema

EMA_PARTS = ("backbone", "head")
EVAL_ON = "ema_params"   # DINO evaluates the teacher
LOCAL_CROPS = True       # the student sees aug.local_crops local crops (multi-crop)


class DINOHead(nn.Module):
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  use_bn: bool = False       # BatchNorm after each hidden layer (DINO's option, used for ResNets)
  dtype: jnp.dtype = jnp.float32   # matmul dtype (the backbone's); parameters stay float32

  @nn.compact
  def __call__(self, x, freeze_last=False):
    init = nn.initializers.truncated_normal(0.02)
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, kernel_init=init, dtype=self.dtype, name=f"fc{i}")(x)
      if self.use_bn:
        x = BatchStatNorm(name=f"bn{i}")(x)
      x = gelu(x)
    x = nn.Dense(self.bottleneck_dim, kernel_init=init, dtype=self.dtype,
                 name=f"fc{self.num_layers - 1}")(x)
    x = x.astype(jnp.float32)    # norms and the prototype scores (logits) in float32
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)
    # Weight normalisation: direction v per output unit, norm g (fixed at 1 when norm_last_layer).
    v = self.param("last_v", init, (self.bottleneck_dim, self.out_dim))
    v = jnp.where(freeze_last, jax.lax.stop_gradient(v), v)
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True).clip(1e-12)
    if not self.norm_last_layer:
      g = self.param("last_g", nn.initializers.ones, (self.out_dim,))
      w = w * jnp.where(freeze_last, jax.lax.stop_gradient(g), g)
    with jax.named_scope("prototypes"):
      return x @ w      # float32: the teacher's 0.04 temperature magnifies bf16 rounding 25x


class DINOModel(nn.Module):
  backbone: VisionTransformer
  head: DINOHead

  def features(self, images, strategy: Strategy = FULL, rng=None):
    """Backbone CLS feature (what evaluation uses, at full length)."""
    return self.backbone(images, strategy, rng)[0]

  def __call__(self, images, strategy: Strategy = FULL, rng=None, freeze_last=False):
    return self.head(self.features(images, strategy, rng), freeze_last)

  def forward_views(self, views, strategies, rngs, freeze_last=False, joint_head=False):
    """(head outputs, backbone features), one per view, view i compressed by strategies[i] (or by
    `strategies` itself when it is one Strategy). The backbone runs per view (views differ in
    length); with `joint_head` the head runs once on all views' features, so its BatchNorm
    (`head_bn`) normalises over every view of the batch, as DINO's multi-crop wrapper does."""
    if isinstance(strategies, Strategy):
      strategies = (strategies,) * len(views)
    features = [self.features(v, s, r) for v, s, r in zip(views, strategies, rngs)]
    if not joint_head:
      return [self.head(f, freeze_last) for f in features], features
    out = self.head(jnp.concatenate(features, axis=0), freeze_last)
    return jnp.split(out, len(views), axis=0), features


def teacher_temp_at(progress, warmup_temp: float, temp: float, warmup_fraction: float):
  """Linear warm-up from `warmup_temp` to `temp` over the first `warmup_fraction` of the budget."""
  if warmup_fraction <= 0:
    return jnp.asarray(temp, jnp.float32)
  frac = jnp.clip(progress / warmup_fraction, 0.0, 1.0)
  return warmup_temp + (temp - warmup_temp) * frac


def sinkhorn_knopp(logits, temp, iterations: int = 3):
  """[B, K] teacher logits -> [B, K] targets, each row a distribution, each of the K prototypes
  given ~B/K of the batch's mass. The sums run over the whole (global, possibly sharded) batch."""
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32) / temp
  q = jnp.exp(logits - jnp.max(logits))      # one shift for all entries: normalised away below
  for _ in range(iterations):
    q = q / jnp.sum(q, axis=0, keepdims=True)   # every prototype: the same mass
    q = q / jnp.sum(q, axis=1, keepdims=True)   # every sample: a distribution
  return q


def teacher_targets(teacher_out, center, teacher_temp, centering: str = "ema"):
  """The teacher's target distributions, one [N, K] array per global view."""
  if centering == "sinkhorn":
    joint = sinkhorn_knopp(jnp.concatenate(teacher_out, axis=0), teacher_temp)
    return jnp.split(joint, len(teacher_out), axis=0)
  return [jax.nn.softmax((jax.lax.stop_gradient(t) - center) / teacher_temp, axis=-1)
          for t in teacher_out]


def dino_loss(student_out, teacher_out, center, student_temp: float, teacher_temp,
              centering: str = "ema"):
  """student_out: V_s arrays [N, K] (global views first); teacher_out: V_t arrays [N, K] (the global
  views, in the same order). Mean over pairs (teacher i, student v), v != i, of the batch-mean
  cross-entropy. Returns (loss, teacher probabilities)."""
  # Softmaxes and the cross-entropy in float32 whatever the heads' dtype (precision policy).
  student_out = [s.astype(jnp.float32) for s in student_out]
  teacher_out = [t.astype(jnp.float32) for t in teacher_out]
  teacher_probs = teacher_targets(teacher_out, center, teacher_temp, centering)
  student_logp = [jax.nn.log_softmax(s / student_temp, axis=-1) for s in student_out]
  total, pairs = 0.0, 0
  for i, p in enumerate(teacher_probs):
    for v, logq in enumerate(student_logp):
      if v == i:
        continue
      total = total + jnp.mean(jnp.sum(-p * logq, axis=-1))
      pairs += 1
  return total / pairs, teacher_probs


def koleo_loss(features, eps: float = 1e-8):
  """KoLeo (Sablayrolles et al. 2019, as in DINOv2): [N, D] features -> -mean_i log(min_j!=i
  ||x_i - x_j||) on L2-normalised rows. The batch is the global one (sharded or not)."""
  x = features.astype(jnp.float32)
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(eps)
  similarity = x @ x.T - 3.0 * jnp.eye(x.shape[0])     # never pick oneself (cosines are >= -1)
  nearest = x[jnp.argmax(similarity, axis=-1)]
  distance = jnp.sqrt(jnp.sum((x - nearest) ** 2, axis=-1) + eps)   # eps: > 0, finite gradient
  return -jnp.mean(jnp.log(distance))


def update_center(center, teacher_out, momentum: float):
  """center <- m * center + (1 - m) * mean over the (global) batch and teacher views."""
  batch_mean = jnp.mean(jnp.concatenate(teacher_out, axis=0).astype(jnp.float32), axis=0)
  return momentum * center + (1.0 - momentum) * jax.lax.stop_gradient(batch_mean)


def loss_fn(model: DINOModel, params, teacher_params, center, global_views, local_views, *,
            student_temp: float, teacher_temp, center_momentum: float, freeze_last=False,
            strategies: BranchStrategies = BranchStrategies(), rng=None, centering: str = "ema",
            koleo_weight: float = 0.0, joint_head: bool = False):
  """(loss, new centre, teacher probabilities) for one batch of global and local views."""
  views = tuple(global_views) + tuple(local_views)
  rngs = (jax.random.split(rng, len(views) + len(global_views)) if rng is not None
          else [None] * (len(views) + len(global_views)))
  # Student: global views at strategies.query, local crops at strategies.local_strategy; teacher:
  # global views at strategies.key (token keep draws its own tokens, as MoCo's key branch does).
  student_strategies = ((strategies.query,) * len(global_views)
                        + (strategies.local_strategy,) * len(local_views))
  student_out, student_features = model.apply(
      {"params": params}, views, student_strategies, rngs[:len(views)], freeze_last, joint_head,
      method=DINOModel.forward_views)
  teacher_out, _ = model.apply(
      {"params": teacher_params}, tuple(global_views), (strategies.key,) * len(global_views),
      rngs[len(views):], joint_head=joint_head, method=DINOModel.forward_views)
  teacher_out = [jax.lax.stop_gradient(t) for t in teacher_out]
  value, probs = dino_loss(student_out, teacher_out, center, student_temp, teacher_temp, centering)
  if koleo_weight:
    # DINOv2: one term per global view, summed.
    value = value + koleo_weight * sum(koleo_loss(f)
                                       for f in student_features[:len(global_views)])
  # The EMA centre is kept up to date under either centring (a diagnostic under 'sinkhorn').
  return value, update_center(center, teacher_out, center_momentum), probs


# --------------------------------------------------------------- the interface the trainer calls
def build(config, backbone: VisionTransformer) -> DINOModel:
  h = config.dino
  return DINOModel(backbone=backbone, head=DINOHead(
      out_dim=h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim,
      num_layers=h.head_layers, norm_last_layer=h.norm_last_layer, use_bn=h.head_bn,
      dtype=backbone.dtype))


def init_extra(config) -> dict:
  return {"center": jnp.zeros((config.dino.out_dim,), jnp.float32)}


def momentum(config, progress):
  h = config.dino
  return ema.momentum_at(progress, h.base_momentum, h.final_momentum)


def loss(model, params, ema_params, extra, views, config, strategies: BranchStrategies, rng,
         progress):
  h = config.dino
  teacher_temp = teacher_temp_at(progress, h.warmup_teacher_temp, h.teacher_temp,
                                 h.warmup_teacher_temp_fraction)
  # A stage may run fewer local crops than the recipe makes ('crops<N>'): the first N.
  local_views = tuple(views.get("local_views", ()))[:strategies.local_crops]
  value, center, probs = loss_fn(
      model, params, ema_params, extra["center"], views["views"], local_views,
      student_temp=h.student_temp, teacher_temp=teacher_temp, center_momentum=h.center_momentum,
      freeze_last=progress < h.freeze_last_layer_fraction, strategies=strategies, rng=rng,
      centering=h.centering, koleo_weight=float(h.koleo_weight),
      joint_head=h.head_batch == "all_views")
  # Collapse diagnostics: a collapsed teacher has per-sample entropy ~0 (one dimension dominates)
  # or ~log(out_dim) (uniform).
  p = jnp.concatenate(probs, axis=0)
  entropy = jnp.mean(-jnp.sum(p * jnp.log(p.clip(1e-12)), axis=-1))
  return value, ({"center": center}, {"teacher_temp": teacher_temp, "teacher_entropy": entropy})


def cost_branches(config, strategies: BranchStrategies):
  """Student: 2 global views (strategies.query) + local crops (strategies.local_strategy; all of
  aug.local_crops, or strategies.local_crops of them) with gradient; teacher: 2 global views
  (strategies.key) without."""
  m, h = config.model, config.dino
  head = (compression.mlp_flops([m.width] + [h.hidden_dim] * (h.head_layers - 1)
                                + [h.bottleneck_dim]) + 2.0 * h.bottleneck_dim * h.out_dim)
  q_global = strategies.query.layout(m.image_size, m.patch_size)
  q_local = strategies.local_strategy.layout(config.aug.local_size, m.patch_size)
  k_global = strategies.key.layout(m.image_size, m.patch_size)
  num_local = (config.aug.local_crops if strategies.local_crops is None
               else min(strategies.local_crops, config.aug.local_crops))
  return (2 * [compression.Branch(q_global, head, with_grad=True)]
          + num_local * [compression.Branch(q_local, head, with_grad=True)]
          + 2 * [compression.Branch(k_global, head, with_grad=False)])
