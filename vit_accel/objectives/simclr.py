"""SimCLR (Chen et al. 2020): one encoder (backbone + projector) for both views, NT-Xent over the
global batch: each of the 2N projections has its other view as positive and the remaining 2N - 2 as
negatives.

Both views carry gradients, so both run the stage's gradient-branch strategy (`strategies.query`);
there is no key branch, and a 'QUERY|KEY' spec's key half is ignored. Optimiser: AdamW as for
MoCo-v3 ViTs (the original LARS recipe targets ResNets); see configs/fmnist_simclr.py.
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

EMA_PARTS = ()       # no momentum encoder
EVAL_ON = "params"
LOCAL_CROPS = False  # two views only


class SimCLRModel(nn.Module):
  backbone: VisionTransformer
  proj_hidden_dim: int = 2048
  out_dim: int = 128
  proj_layers: int = 2

  def setup(self):
    self.projector = MLPHead(self.proj_hidden_dim, self.out_dim, num_layers=self.proj_layers,
                             last_bn=True, dtype=self.backbone.dtype)

  def features(self, images, strategy: Strategy = FULL, rng=None):
    """Backbone CLS feature (what evaluation uses, at full length)."""
    return self.backbone(images, strategy, rng)[0]

  def __call__(self, images, strategy: Strategy = FULL, rng=None):
    return self.projector(self.features(images, strategy, rng))


def nt_xent(z1, z2, temperature: float):
  """Normalised-temperature cross-entropy over the 2N projections of N pairs: anchor i's positive is
  its other view; every other projection but itself is a negative (2N - 2 of them). Mean over the
  2N anchors."""
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)
  n = z1.shape[0]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # no self-similarity
  labels = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def loss_fn(model: SimCLRModel, params, views, temperature: float, strategy: Strategy = FULL,
            rng=None):
  v1, v2 = views
  rngs = jax.random.split(rng, 2) if rng is not None else [None, None]
  z1 = model.apply({"params": params}, v1, strategy, rngs[0])
  z2 = model.apply({"params": params}, v2, strategy, rngs[1])
  return nt_xent(z1, z2, temperature)


# --------------------------------------------------------------- the interface the trainer calls
def build(config, backbone: VisionTransformer) -> SimCLRModel:
  h = config.simclr
  return SimCLRModel(backbone=backbone, proj_hidden_dim=h.proj_hidden_dim, out_dim=h.out_dim,
                     proj_layers=h.proj_layers)


def init_extra(config) -> dict:
  return {}


def momentum(config, progress):
  return jnp.zeros((), jnp.float32)  # nothing to average


def loss(model, params, ema_params, extra, views, config, strategies: BranchStrategies, rng,
         progress):
  value = loss_fn(model, params, views["views"], float(config.simclr.temperature),
                  strategies.query, rng)
  return value, (extra, {})


def cost_branches(config, strategies: BranchStrategies):
  """Two views, each through backbone + projector with gradient, at the gradient-branch strategy."""
  m, h = config.model, config.simclr
  proj = compression.mlp_flops([m.width] + [h.proj_hidden_dim] * (h.proj_layers - 1) + [h.out_dim])
  layout = strategies.query.layout(m.image_size, m.patch_size)
  return 2 * [compression.Branch(layout, proj, with_grad=True)]
