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

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_accel import compression
from vit_accel.compression import FULL, Strategy
from vit_accel.config_domains import DOMAINS

Dtype = Any


def gelu(x):
  """Exact (erf) GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016), any shape,
  in x's dtype. The same function as `jax.nn.gelu(x, approximate=False)` (within 1e-6 absolute in
  float32), written through erf rather than erfc: XLA's CPU backend evaluates erf as a short
  polynomial, erfc with exponentials and branches - ~2.8x slower forward, 1.3x with the gradient,
  ~8% of the embedded default's whole train step on a CPU. For x << 0 both are ~0.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general` with the same result, for the dense layers' contractions: where the rhs
  (a kernel) has no batch dimensions, the lhs contracts its trailing dimensions and the rhs its
  leading ones, it runs as one 2-D matmul [M, K] x [K, N] on flattened operands and reshapes back.

  Why: autodiff of the unflattened form gives the kernel gradient as a contraction over two or more
  lhs dimensions (batch and tokens), which XLA's CPU backend lays out with a transposing copy fused
  to the producer's elementwise work (GELU's derivative, LayerNorm's): measured ~2.4x slower for the
  ViT MLP's forward and backward on a 2-core AVX-512 CPU. The flattened form's gradient is a plain
  [K, M] x [M, N] matmul. Any other dimension numbers go to `jax.lax.dot_general` unchanged.
  Same signature and dtypes as `jax.lax.dot_general` (flax's `dot_general` hook).
  """
  (lc, rc), (lb, rb) = dimension_numbers
  k = len(lc)
  if lb or rb or tuple(lc) != tuple(range(lhs.ndim - k, lhs.ndim)) or tuple(rc) != tuple(range(k)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  lead, rest = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
  out = jax.lax.dot_general(lhs.reshape(-1, math.prod(lhs.shape[lhs.ndim - k:])),
                            rhs.reshape(math.prod(rhs.shape[:k]), -1), (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
  return out.reshape(*lead, *rest)


class MlpBlock(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 dot_general=flat_dot_general, name="fc1")(x)
    # Exact (erf) GELU as in timm's, MoCo-v3's and DINO's ViTs: exports compute the same in timm.
    x = gelu(x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                    dot_general=flat_dot_general, name="fc2")(x)


ATTENTION_IMPLEMENTATIONS = DOMAINS["model.attention"].values   # the config check's list
REMAT_POLICIES = DOMAINS["model.remat"].values


def remat_block(block_cls, policy: str):
  """`block_cls`, or it wrapped in `flax.linen.remat` (jax.checkpoint) by `model.remat=policy`.

  - 'none': the backward pass reads every activation the forward pass stored (fastest; activation
    memory grows with batch x sequence x depth).
  - 'block': each encoder block keeps only its input and recomputes everything inside it in the
    backward pass (~1/3 more matmul work; activation memory of about one block plus the block inputs).
  - 'dots': keeps the outputs of matmuls without batch dimensions (the QKV/output projections and the
    MLP's two dense layers) and recomputes the rest - attention's score and value products, softmax,
    LayerNorm, GELU, residuals (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`): most of
    the saving on long sequences for little extra compute.
  Returns a flax Module class. Raises ValueError for an unknown policy.
  Source: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; jax.checkpoint policies.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat={policy!r}; one of {REMAT_POLICIES}")
  if policy == "none":
    return block_cls
  if policy == "block":
    return nn.remat(block_cls)
  return nn.remat(block_cls, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def attention_implementation(choice: str, dtype, head_dim: int, platform: str | None = None) -> str:
  """Which attention implementation `model.attention=choice` runs (see `dot_product_attention`).

  'auto' picks cuDNN's fused (flash) attention where it applies - a GPU, a 16-bit compute dtype and
  a head dimension that is a multiple of 8 up to 128 (cuDNN's limits) -, 'heads_major' on a CPU
  and XLA's otherwise (TPU, GPU in float32). 'xla' / 'cudnn' / 'heads_major' force one (cudnn
  fails to compile outside those limits). 'heads_major' is the same computation as 'xla' with
  q, k, v transposed to [B, N, T, H] before the two matmuls (`heads_major_attention`).
  Returns 'xla', 'cudnn' or 'heads_major'. Raises ValueError for an unknown choice.
  """
  if choice not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention={choice!r}; one of {ATTENTION_IMPLEMENTATIONS}")
  if choice != "auto":
    return choice
  platform = platform or jax.default_backend()
  if platform == "cpu":
    return "heads_major"
  fused = (platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
           and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fused else "xla"


def dot_product_attention(query, key, value, *, implementation: str = "xla", pad_to: int = 0):
  """Softmax attention of every token to every token: `jax.nn.dot_product_attention`, or the same
  computation heads-major (`heads_major_attention`).

  query, key, value: [B, T, N, H] in the compute dtype. Logits and softmax are float32 whatever the
  compute dtype (JAX's XLA path and cuDNN both accumulate in float32); the output [B, T, N, H] is in
  the inputs' dtype. `implementation`: 'xla' / 'cudnn' (`jax.nn.dot_product_attention`'s) or
  'heads_major' (`heads_major_attention`). pad_to > 1 pads T up to a multiple of it, masks the
  padded keys out and drops the padded queries: the same numbers, for fused kernels that run
  faster on aligned lengths. Source: Vaswani et al. 2017, scaled by 1/sqrt(H).
  """
  t = query.shape[1]
  padded = -(-t // pad_to) * pad_to if pad_to > 1 else t
  if padded > t:
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    query, key, value = (jnp.pad(a, pad) for a in (query, key, value))
  if implementation == "heads_major":
    out = heads_major_attention(query, key, value, valid_keys=t if padded > t else None)
  else:
    lengths = jnp.full((query.shape[0],), t, jnp.int32) if padded > t else None
    out = jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=lengths,
                                       implementation=implementation)
  return out[:, :t]


def heads_major_attention(query, key, value, valid_keys: int | None = None):
  """Softmax attention as `jax.nn.dot_product_attention`'s XLA path computes it (logits and softmax
  in float32, probabilities cast to the inputs' dtype for the value product, 1/sqrt(H) scale),
  with q, k, v transposed to heads-major [B, N, T, H] first and the output transposed back.

  query, key, value: [B, T, N, H]; returns [B, T, N, H] in their dtype. valid_keys: only the first
  `valid_keys` key positions are attended to (padding masked out); None: all.

  Why: XLA's CPU backend runs the two batched matmuls on [B, N, ...] operands it can read in
  place, so the layout copies come once per tensor instead of around each product and its
  gradients; on a 2-core CPU the embedded default's MoCo-v3 train step ran 10-27% faster at full
  length (two processes per arm; bench/results/README.md). Other backends keep
  `jax.nn.dot_product_attention` ('auto'). float16 operands ask for the F16_F16_F32 dot algorithm,
  which XLA's CPU backend does not implement (as with JAX's own path under jit); the configs allow
  float32 and bfloat16.
  """
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (query, key, value))
  # 16-bit operands accumulate in float32 with a stated algorithm, as JAX's own path does, so the
  # backward matmuls keep 16-bit operands too.
  precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(q.dtype)
  logits = jnp.einsum("bnth,bnsh->bnts", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(query.shape[-1] ** -0.5)
  if valid_keys is not None:
    keep = jnp.arange(logits.shape[-1]) < valid_keys
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bnts,bnsh->bnth", probs, v).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _rows_cotangent(y):
  """Identity whose cotangent is materialised as rows [M, ...] (an optimisation barrier), so that
  the bias gradient before it is a reduction over one dimension."""
  return y


_rows_cotangent.defvjp(lambda y: (y, None), lambda _, g: (jax.lax.optimization_barrier(g),))


class SelfAttention(nn.Module):
  """Multi-head self-attention on token rows: `__call__(x [B*T, D], (B, T)) -> [B*T, D]`.

  The parameters are flax's `MultiHeadDotProductAttention`'s, name for name and shape for shape
  (query / key / value: kernel [D, N, H], bias [N, H]; out: kernel [N, H, D], bias [D]; the same
  initialisers), so checkpoints and the timm export read them unchanged. The projections run on the
  [B*T, D] rows rather than [B, T, D]: their bias gradients then sum over one dimension, which XLA's
  CPU backend reduces quickly, instead of over batch and tokens together, which it splits into
  slow padded window reductions (~5% of the embedded default's CPU train step). Only the attention
  itself sees [B, T, N, H] (`dot_product_attention`).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "xla"
  pad_to: int = 0

  @nn.compact
  def __call__(self, x, batch_and_tokens: tuple[int, int]):
    b, t = batch_and_tokens
    width = x.shape[-1]
    head_dim = width // self.num_heads
    init = nn.initializers.xavier_uniform()

    def project(name):
      y = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, kernel_init=init,
                          dot_general=flat_dot_general, name=name)(x)
      return _rows_cotangent(y).reshape(b, t, self.num_heads, head_dim)

    query, key, value = project("query"), project("key"), project("value")
    y = dot_product_attention(query, key, value, implementation=self.implementation,
                              pad_to=self.pad_to)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=init,
                           dot_general=flat_dot_general,
                           name="out")(y.reshape(b * t, self.num_heads, head_dim))


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"     # model.attention: 'auto' | 'xla' | 'cudnn' | 'heads_major'
  attention_pad_to: int = 0   # model.attention_pad_to

  @nn.compact
  def __call__(self, x):
    b, t, width = x.shape
    implementation = attention_implementation(self.attention, self.dtype, width // self.num_heads)
    # Per-token layers work on [B*T, width] rows (see SelfAttention for why).
    x = x.reshape(b * t, width)
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    x = x + SelfAttention(self.num_heads, dtype=self.dtype, implementation=implementation,
                          pad_to=self.attention_pad_to, name="attn")(y, (b, t))
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    return x.reshape(b, t, width)


class FlexiPatchEmbed(nn.Module):
  """Patch embedding with one learned kernel at the base patch size, applied at any patch size via
  the pseudo-inverse resize (gradients flow into the base kernel)."""
  width: int
  base_patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, patch_size: int, keep=None):
    """images [B, S, S, C] -> tokens [B, (S / patch_size)^2, width], or [B, K, width] for the
    patches at `keep` [B, K] (int indices into the row-major patch grid) only."""
    channels = images.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.base_patch, self.base_patch, channels, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    with jax.named_scope("pi_resize"):   # a float32 weight transform (named for profiles)
      kernel = compression.pi_resize_kernel(kernel, patch_size).astype(self.dtype)
    b, s, _, c = images.shape
    g = s // patch_size
    # Patchify + one matmul: the same as a stride-p convolution, and faster on CPU.
    patches = images.astype(self.dtype).reshape(b, g, patch_size, g, patch_size, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, patch_size * patch_size * c)
    if keep is not None:   # pixels carry no gradient: this gather has no backward at all
      patches = compression.gather_rows(patches, keep)
    return (flat_dot_general(patches, kernel.reshape(-1, self.width), (((2,), (0,)), ((), ())))
            + bias.astype(self.dtype))


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
  attention: str = "auto"
  attention_pad_to: int = 0
  remat: str = "none"      # model.remat: 'none' | 'block' | 'dots' (see remat_block)

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
    block = remat_block(EncoderBlock, self.remat)
    self.blocks = [block(self.num_heads, int(self.width * self.mlp_ratio), dtype=self.dtype,
                                attention=self.attention, attention_pad_to=self.attention_pad_to,
                                name=f"block{i}") for i in range(self.depth)]
    self.norm = nn.LayerNorm(dtype=self.dtype, name="norm")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def layout(self, strategy: Strategy, image_size: int | None = None) -> compression.Layout:
    return strategy.layout(image_size or self.image_size, self.patch_size)

  def embed(self, images, strategy: Strategy = FULL, keep=None):
    """Images [B, S, S, C] -> patch tokens with position embeddings [B, n*n, width] (no CLS) for
    the strategy's patch size / resolution; with `keep` [B, K] (int patch indices, as
    `compression.keep_indices`) only those patches' tokens, [B, K, width]. S is usually
    model.image_size; other sides (DINO's local crops) get the position-embedding grid resized to
    their own token grid."""
    if images.shape[1] != images.shape[2]:
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}; views must be square")
    lay = self.layout(strategy, images.shape[1])
    if lay.input_size != images.shape[1]:
      b, _, _, c = images.shape
      images = jax.image.resize(images, (b, lay.input_size, lay.input_size, c), method="linear")
    x = self.patch_embed(images, lay.patch_size, keep)
    with jax.named_scope("pos_resize"):  # likewise, for the position-embedding grid
      pos = compression.resize_pos_embed(self.pos_embed, lay.grid)
    if keep is not None:   # per sample, as keep_tokens: a backward without colliding indices
      pos = compression.gather_rows(jnp.broadcast_to(pos, (keep.shape[0],) + pos.shape[1:]), keep)
    return x + pos.astype(x.dtype)

  def tokens(self, images, strategy: Strategy = FULL, rng=None):
    """The sequence the blocks see: [CLS, kept patch tokens] -> [B, 1 + K, width]. The kept
    patches are those of `compression.keep_tokens` for this rng, gathered before the embedding."""
    lay = self.layout(strategy, images.shape[1])
    keep = None
    if lay.kept < lay.num_patches:
      if rng is None:
        raise ValueError(f"strategy {strategy.spec} drops tokens and needs an rng")
      keep = compression.keep_indices(rng, images.shape[0], lay.num_patches, lay.kept)
    x = self.embed(images, strategy, keep)
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
