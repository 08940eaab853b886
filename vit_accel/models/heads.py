"""Projection / prediction MLP heads for the self-supervised objectives."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class BatchStatNorm(nn.Module):
  """Batch normalisation using the statistics of the current (global) batch only.

  The heads exist only during pretraining, where BatchNorm always runs in training mode; running
  averages would never be read, so we keep none and the train state stays a plain param tree. Under
  jit over a sharded batch the mean/variance are over the *global* batch (the compiler inserts the
  reductions), i.e. SyncBN as in MoCo-v3.
  """
  use_scale: bool = True
  use_bias: bool = True
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    # Statistics in float32 whatever the compute dtype (a bfloat16 batch variance loses the small
    # differences BatchNorm exists to amplify); the output keeps x's dtype.
    y = x.astype(jnp.float32)
    mean = jnp.mean(y, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=0, keepdims=True)
    y = (y - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return y.astype(x.dtype)


class MLPHead(nn.Module):
  """MoCo-v3 style MLP: (Linear -> BN -> ReLU) x (num_layers-1) -> Linear [-> BN without affine]."""
  hidden_dim: int
  out_dim: int
  num_layers: int = 3
  last_bn: bool = True
  dtype: Any = jnp.float32   # matmul dtype (the backbone's); parameters stay float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name=f"fc{i}")(x)
      x = BatchStatNorm(name=f"bn{i}")(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, use_bias=not self.last_bn, dtype=self.dtype,
                 name=f"fc{self.num_layers - 1}")(x)
    if self.last_bn:
      x = BatchStatNorm(use_scale=False, use_bias=False, name=f"bn{self.num_layers - 1}")(x)
    return x
