"""MoCo-v3 (Chen, Xie, He 2021): a query encoder (backbone + projector + predictor) trained to match
a momentum key encoder (EMA of backbone + projector) with InfoNCE over the global batch.

Pure functions plus one linen module; the trainer owns the state and the EMA update.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_accel import compression
from vit_accel.compression import FULL, BranchStrategies, Strategy
from vit_accel.models.heads import MLPHead
from vit_accel.models.vit import VisionTransformer
from vit_accel.objectives import ema
from vit_accel.objectives.ema import momentum_at  # noqa: F401  (re-exported: MoCo's momentum)

# Parameter subtrees the momentum (key) encoder tracks; the predictor exists only on the query side.
KEY_ENCODER_PARTS = ("backbone", "projector")
EMA_PARTS = KEY_ENCODER_PARTS
EVAL_ON = "params"   # the query (base) encoder, as in MoCo-v3's linear evaluation
LOCAL_CROPS = False  # two views only


class MoCoV3Model(nn.Module):
  backbone: VisionTransformer
  proj_hidden_dim: int = 1024
  out_dim: int = 256
  pred_hidden_dim: int = 1024

  def setup(self):
    dtype = self.backbone.dtype   # heads compute in the backbone's dtype
    self.projector = MLPHead(self.proj_hidden_dim, self.out_dim, num_layers=3, last_bn=True,
                             dtype=dtype)
    self.predictor = MLPHead(self.pred_hidden_dim, self.out_dim, num_layers=2, last_bn=False,
                             dtype=dtype)

  def features(self, images, strategy: Strategy = FULL, rng=None):
    """Backbone CLS feature (what evaluation uses, at full length)."""
    return self.backbone(images, strategy, rng)[0]

  def query(self, images, strategy: Strategy = FULL, rng=None):
    return self.predictor(self.projector(self.features(images, strategy, rng)))

  def key(self, images, strategy: Strategy = FULL, rng=None):
    return self.projector(self.features(images, strategy, rng))

  def __call__(self, images):  # used for init: touches every submodule
    return self.query(images)


def infonce(q, k, temperature: float):
  """MoCo-v3 contrastive loss: q_i's positive is k_i, the other keys of the (global) batch are
  negatives; cross-entropy on cosine logits / temperature, scaled by 2*temperature as in MoCo-v3."""
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)   # logits in float32 (precision policy)
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True).clip(1e-12)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True).clip(1e-12)
  logits = jnp.einsum("nc,mc->nm", q, k) / temperature
  labels = jnp.arange(q.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return 2.0 * temperature * jnp.mean(ce)


def key_params_of(params):
  return ema.parts_of(params, KEY_ENCODER_PARTS)


def ema_update(key_params, params, momentum):
  """key <- momentum * key + (1 - momentum) * query (for the key-encoder parts)."""
  return ema.update(key_params, params, momentum)


def loss_fn(model: MoCoV3Model, params, key_params, views, temperature: float,
            symmetric: bool = True, strategies: BranchStrategies = BranchStrategies(), rng=None):
  """MoCo-v3 loss for two views. Symmetric: ctr(q1, k2) + ctr(q2, k1) (the official recipe);
  asymmetric: ctr(q1, k2) only (the paper's accelerated setting, half the query cost).

  The query (gradient) branch runs `strategies.query`, the key branch `strategies.key`; `rng` picks
  the kept tokens, a different stream per (branch, view)."""
  v1, v2 = views
  rngs = jax.random.split(rng, 4) if rng is not None else [None] * 4

  def q(view, r):
    return model.apply({"params": params}, view, strategies.query, r, method=MoCoV3Model.query)

  def k(view, r):
    out = model.apply({"params": key_params}, view, strategies.key, r, method=MoCoV3Model.key)
    return jax.lax.stop_gradient(out)

  loss = infonce(q(v1, rngs[0]), k(v2, rngs[1]), temperature)
  if symmetric:
    loss = loss + infonce(q(v2, rngs[2]), k(v1, rngs[3]), temperature)
  return loss


# --------------------------------------------------------------- the interface the trainer calls
def build(config, backbone: VisionTransformer) -> MoCoV3Model:
  h = config.mocov3
  return MoCoV3Model(backbone=backbone, proj_hidden_dim=h.proj_hidden_dim, out_dim=h.out_dim,
                     pred_hidden_dim=h.pred_hidden_dim)


def init_extra(config) -> dict:
  return {}


def momentum(config, progress):
  return momentum_at(progress, config.mocov3.base_momentum)


def loss(model, params, ema_params, extra, views, config, strategies: BranchStrategies, rng,
         progress):
  value = loss_fn(model, params, ema_params, views["views"], float(config.mocov3.temperature),
                  symmetric=config.mocov3.symmetric, strategies=strategies, rng=rng)
  return value, (extra, {})


def cost_branches(config, strategies: BranchStrategies):
  """The branches of one MoCo-v3 step per sample, for the cost model: each view through the query
  (backbone + projector + predictor, with gradient) and through the key (backbone + projector)."""
  m, h = config.model, config.mocov3
  proj = compression.mlp_flops([m.width, h.proj_hidden_dim, h.proj_hidden_dim, h.out_dim])
  pred = compression.mlp_flops([h.out_dim, h.pred_hidden_dim, h.out_dim])
  q_layout = strategies.query.layout(m.image_size, m.patch_size)
  k_layout = strategies.key.layout(m.image_size, m.patch_size)
  views = 2 if h.symmetric else 1
  return views * [compression.Branch(q_layout, proj + pred, with_grad=True),
                  compression.Branch(k_layout, proj, with_grad=False)]
