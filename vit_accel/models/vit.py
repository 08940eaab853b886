"""Vision Transformer backbone (flax.linen).

Pre-norm ViT with a CLS token and learned position embeddings, as in MoCo-v3 / DINO. Images enter as
float (already normalised on device); the output is the final-LayerNorm'd CLS vector (the feature used
for kNN / linear evaluation) plus the patch tokens.

Sequence compression (token keep, flexible patch size) plugs in between `embed` and the blocks; the
split into `embed` / `encode` exists so that stage can be inserted without touching the blocks.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class MlpBlock(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                    name="fc2")(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class VisionTransformer(nn.Module):
  """ViT backbone. `__call__(images) -> (cls_feature [B, width], patch_tokens [B, N, width])`."""
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  patch_size: int = 16
  image_size: int = 224
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"model.patch_size={self.patch_size} does not tile "
                       f"model.image_size={self.image_size}; pick a divisor of the image size.")
    grid = self.image_size // self.patch_size
    self.patch_embed = nn.Conv(
        self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
        dtype=self.dtype, kernel_init=nn.initializers.lecun_normal(), name="patch_embed")
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, grid * grid, self.width))
    self.blocks = [EncoderBlock(self.num_heads, int(self.width * self.mlp_ratio), dtype=self.dtype,
                                name=f"block{i}") for i in range(self.depth)]
    self.norm = nn.LayerNorm(dtype=self.dtype, name="norm")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def embed(self, images):
    """Images [B, S, S, C] -> patch tokens with position embeddings [B, N, width] (no CLS)."""
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the model expects "
                       f"model.image_size={self.image_size}")
    x = self.patch_embed(images)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c) + self.pos_embed.astype(x.dtype)

  def encode(self, tokens):
    """Patch tokens [B, K, width] -> (cls feature, patch tokens) after CLS prepend and blocks."""
    b = tokens.shape[0]
    cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, tokens], axis=1)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return x[:, 0], x[:, 1:]

  def __call__(self, images):
    return self.encode(self.embed(images))
