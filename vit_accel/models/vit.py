"""Vision Transformer backbone (flax.linen) with sequence compression built in.

Pre-norm ViT with a CLS token and learned position embeddings, as in MoCo-v3 / DINO. Images enter as
float (already normalised on device); the output is the final-LayerNorm'd CLS vector (the feature used
for kNN / linear evaluation) plus the patch tokens.

Every call takes a `compression.Strategy` (default: full length). Inside the graph it resizes the
image (resolution scaling, or a patch size that does not divide the image), PI-resizes the one learned
base-size patch kernel to the strategy's patch size, resizes the position-embedding grid, and keeps a
random subset of patch tokens per sample. Shapes depend only on the strategy, so each strategy is one
static-shaped program.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_accel import compression
from vit_accel.compression import FULL, Strategy

Dtype = Any


class MlpBlock(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 name="fc1")(x)
    # Exact (erf) GELU as in timm's, MoCo-v3's and DINO's ViTs: exports compute the same in timm.
    x = nn.gelu(x, approximate=False)
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


class FlexiPatchEmbed(nn.Module):
  """Patch embedding with one learned kernel at the base patch size, applied at any patch size via
  the pseudo-inverse resize (gradients flow into the base kernel)."""
  width: int
  base_patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, patch_size: int):
    channels = images.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.base_patch, self.base_patch, channels, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    kernel = compression.pi_resize_kernel(kernel, patch_size).astype(self.dtype)
    b, s, _, c = images.shape
    g = s // patch_size
    # Patchify + one matmul: the same as a stride-p convolution, and faster on CPU.
    patches = images.astype(self.dtype).reshape(b, g, patch_size, g, patch_size, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, patch_size * patch_size * c)
    return patches @ kernel.reshape(-1, self.width) + bias.astype(self.dtype)


class VisionTransformer(nn.Module):
  """ViT backbone. `__call__(images, strategy, rng) -> (cls_feature [B, width], tokens [B, K, width])`.

  `rng` is needed only when the strategy drops tokens."""
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  patch_size: int = 16     # base patch size: the learned kernel's size
  image_size: int = 224
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"model.patch_size={self.patch_size} does not tile "
                       f"model.image_size={self.image_size}; pick a divisor of the image size.")
    grid = self.image_size // self.patch_size
    self.patch_embed = FlexiPatchEmbed(self.width, self.patch_size, dtype=self.dtype,
                                       name="patch_embed")
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, grid * grid, self.width))
    self.blocks = [EncoderBlock(self.num_heads, int(self.width * self.mlp_ratio), dtype=self.dtype,
                                name=f"block{i}") for i in range(self.depth)]
    self.norm = nn.LayerNorm(dtype=self.dtype, name="norm")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def layout(self, strategy: Strategy, image_size: int | None = None) -> compression.Layout:
    return strategy.layout(image_size or self.image_size, self.patch_size)

  def embed(self, images, strategy: Strategy = FULL):
    """Images [B, S, S, C] -> patch tokens with position embeddings [B, n*n, width] (no CLS, nothing
    dropped yet) for the strategy's patch size / resolution. S is usually model.image_size; other
    sides (DINO's local crops) get the position-embedding grid resized to their own token grid."""
    if images.shape[1] != images.shape[2]:
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}; views must be square")
    lay = self.layout(strategy, images.shape[1])
    if lay.input_size != images.shape[1]:
      b, _, _, c = images.shape
      images = jax.image.resize(images, (b, lay.input_size, lay.input_size, c), method="linear")
    x = self.patch_embed(images, lay.patch_size)
    pos = compression.resize_pos_embed(self.pos_embed, lay.grid)
    return x + pos.astype(x.dtype)

  def tokens(self, images, strategy: Strategy = FULL, rng=None):
    """The sequence the blocks see: [CLS, kept patch tokens] -> [B, 1 + K, width]."""
    x = self.embed(images, strategy)
    kept = self.layout(strategy, images.shape[1]).kept
    if kept < x.shape[1]:
      if rng is None:
        raise ValueError(f"strategy {strategy.spec} drops tokens and needs an rng")
      x = compression.keep_tokens(x, rng, kept)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.width))
    return jnp.concatenate([cls, x], axis=1)

  def encode(self, x):
    """Sequence [B, 1 + K, width] -> (cls feature, patch tokens) after the blocks."""
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return x[:, 0], x[:, 1:]

  def __call__(self, images, strategy: Strategy = FULL, rng=None):
    return self.encode(self.tokens(images, strategy, rng))
