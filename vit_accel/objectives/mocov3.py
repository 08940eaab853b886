"""MoCo-v3 (Chen, Xie, He 2021): a query encoder (backbone + projector + predictor) trained to match
a momentum key encoder (EMA of backbone + projector) with InfoNCE over the global batch.

Pure functions plus one linen module; the trainer owns the state and the EMA update.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_accel.models.heads import MLPHead
from vit_accel.models.vit import VisionTransformer

# Parameter subtrees the momentum (key) encoder tracks; the predictor exists only on the query side.
KEY_ENCODER_PARTS = ("backbone", "projector")


class MoCoV3Model(nn.Module):
  backbone: VisionTransformer
  proj_hidden_dim: int = 1024
  out_dim: int = 256
  pred_hidden_dim: int = 1024

  def setup(self):
    self.projector = MLPHead(self.proj_hidden_dim, self.out_dim, num_layers=3, last_bn=True)
    self.predictor = MLPHead(self.pred_hidden_dim, self.out_dim, num_layers=2, last_bn=False)

  def features(self, images):
    """Backbone CLS feature (what evaluation uses)."""
    return self.backbone(images)[0]

  def query(self, images):
    return self.predictor(self.projector(self.features(images)))

  def key(self, images):
    return self.projector(self.features(images))

  def __call__(self, images):  # used for init: touches every submodule
    return self.query(images)


def infonce(q, k, temperature: float):
  """MoCo-v3 contrastive loss: q_i's positive is k_i, the other keys of the (global) batch are
  negatives; cross-entropy on cosine logits / temperature, scaled by 2*temperature as in MoCo-v3."""
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True).clip(1e-12)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True).clip(1e-12)
  logits = jnp.einsum("nc,mc->nm", q, k) / temperature
  labels = jnp.arange(q.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return 2.0 * temperature * jnp.mean(ce)


def key_params_of(params):
  return {name: params[name] for name in KEY_ENCODER_PARTS}


def momentum_at(progress, base_momentum: float):
  """Key-encoder momentum: cosine from `base_momentum` at progress 0 to 1 at progress 1."""
  progress = jnp.clip(progress, 0.0, 1.0)
  return 1.0 - (1.0 - base_momentum) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


def ema_update(key_params, params, momentum):
  """key <- momentum * key + (1 - momentum) * query (for the key-encoder parts)."""
  return optax.incremental_update(key_params_of(params), key_params, step_size=1.0 - momentum)


def loss_fn(model: MoCoV3Model, params, key_params, views, temperature: float,
            symmetric: bool = True):
  """MoCo-v3 loss for two views. Symmetric: ctr(q1, k2) + ctr(q2, k1) (the official recipe);
  asymmetric: ctr(q1, k2) only (the paper's accelerated setting, half the query cost)."""
  v1, v2 = views
  q1 = model.apply({"params": params}, v1, method=MoCoV3Model.query)
  k2 = model.apply({"params": key_params}, v2, method=MoCoV3Model.key)
  k2 = jax.lax.stop_gradient(k2)
  loss = infonce(q1, k2, temperature)
  if symmetric:
    q2 = model.apply({"params": params}, v2, method=MoCoV3Model.query)
    k1 = jax.lax.stop_gradient(model.apply({"params": key_params}, v1, method=MoCoV3Model.key))
    loss = loss + infonce(q2, k1, temperature)
  return loss
