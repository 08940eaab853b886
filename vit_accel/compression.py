"""Sequence compression: strategies, their token layouts, the PI-resize, token keep, and the cost model.

A `Strategy` says how one branch's view is turned into a shorter token sequence:
  - flexible patch scaling: a patch size other than the model's base one (kernel PI-resized),
  - resolution scaling: the image downscaled, base patch kept (a baseline from prior work),
  - random token keep: K of the patch tokens kept per sample, K rounded to a bucket so that the set
    of sequence lengths (= compiled programs) stays small.
Specs are short strings so they fit configs and stage lists: "full", "keep0.25", "count16",
"patch8", "patch8,keep0.5", "res16". A branch pair is "QUERY|KEY"; a single spec means the query
(gradient) branch, with the key branch at full length; multi-crop recipes may add a third part for
the local crops, "QUERY|KEY|LOCAL".

Cost is in base-forward units: 1 = one forward pass of the uncompressed backbone on one sample.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vit_accel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a strategy does to an S x S image for a model with base patch b."""
  patch_size: int    # patch size the kernel is applied at
  grid: int          # tokens per side before dropping
  input_size: int    # image side fed to the patch embedding (grid * patch_size)
  num_patches: int   # grid ** 2
  kept: int          # patch tokens kept after random dropping
  seq_len: int       # kept + CLS

  @property
  def compressed(self) -> bool:
    return self.kept < self.num_patches


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One branch's compression. 0 means "not used" for patch_size, keep_count and resolution."""
  patch_size: int = 0        # 0 = the model's base patch size
  keep_ratio: float = 1.0    # fraction of patch tokens kept, in (0, 1]
  keep_count: int = 0        # > 0: keep this many patch tokens (overrides keep_ratio)
  resolution: int = 0        # > 0: resolution scaling to this image side, base patch
  bucket: int = 8            # kept counts round to a multiple of this (or to all patches)

  def __post_init__(self):
    if not 0.0 < self.keep_ratio <= 1.0:
      raise UserError(f"compression keep ratio {self.keep_ratio} is outside (0, 1]")
    if self.keep_count < 0 or self.patch_size < 0 or self.resolution < 0:
      raise UserError(f"compression strategy {self.spec} has a negative size")
    if self.bucket <= 0:
      raise UserError(f"compression.bucket={self.bucket} must be positive")
    if self.patch_size and self.resolution:
      raise UserError(f"compression strategy {self.spec}: choose patch scaling or resolution "
                      f"scaling, not both")

  # ------------------------------------------------------------------------------ spec strings
  @classmethod
  def parse(cls, spec: str, bucket: int = 8) -> Strategy:
    fields = {}
    for part in filter(None, (p.strip() for p in str(spec).lower().split(","))):
      try:
        if part == "full":
          continue
        if part.startswith("keep"):
          fields["keep_ratio"] = float(part[4:])
        elif part.startswith("count"):
          fields["keep_count"] = int(part[5:])
        elif part.startswith("patch"):
          fields["patch_size"] = int(part[5:])
        elif part.startswith("res"):
          fields["resolution"] = int(part[3:])
        else:
          raise ValueError(part)
      except ValueError:
        raise UserError(f"cannot read compression strategy {spec!r} (part {part!r}); use e.g. "
                        f"'full', 'keep0.25', 'count16', 'patch8', 'patch8,keep0.5', 'res16'")
    return cls(bucket=bucket, **fields)

  @property
  def spec(self) -> str:
    parts = []
    if self.patch_size:
      parts.append(f"patch{self.patch_size}")
    if self.resolution:
      parts.append(f"res{self.resolution}")
    if self.keep_count:
      parts.append(f"count{self.keep_count}")
    elif self.keep_ratio < 1.0:
      parts.append(f"keep{self.keep_ratio:g}")
    return ",".join(parts) or "full"

  # ----------------------------------------------------------------------------------- layout
  def layout(self, image_size: int, base_patch: int) -> Layout:
    """Token layout on an `image_size` image for a model with base patch `base_patch`; raises a
    UserError for strategies that cannot apply to that model."""
    patch = self.patch_size or base_patch
    if patch > image_size:
      raise UserError(f"compression strategy {self.spec}: patch {patch} is larger than the "
                      f"{image_size}px image")
    if self.resolution:
      if self.resolution < base_patch:
        raise UserError(f"compression strategy {self.spec}: resolution {self.resolution} is "
                        f"smaller than one base patch ({base_patch})")
      grid = max(1, round(self.resolution / base_patch))
    else:
      grid = max(1, round(image_size / patch))
    n = grid * grid
    wanted = self.keep_count if self.keep_count else self.keep_ratio * n
    if self.keep_count > n:
      raise UserError(f"compression strategy {self.spec}: keeps {self.keep_count} tokens of "
                      f"only {n}")
    kept = round_to_bucket(wanted, n, self.bucket)
    return Layout(patch_size=patch, grid=grid, input_size=grid * patch, num_patches=n, kept=kept,
                  seq_len=kept + 1)


def round_to_bucket(wanted: float, num_patches: int, bucket: int) -> int:
  """Nearest of {bucket, 2*bucket, ... <= num_patches} U {num_patches} to `wanted`; ties go to
  the larger count. Never zero, never above the full length."""
  choices = sorted({*range(bucket, num_patches + 1, bucket), num_patches})
  return min(choices, key=lambda k: (abs(k - wanted), -k))


FULL = Strategy()


@dataclasses.dataclass(frozen=True)
class BranchStrategies:
  """Strategies for the gradient branch (MoCo query / SimCLR views / DINO student's global views),
  the no-gradient branch (MoCo key / DINO teacher) and, for multi-crop recipes, the student's local
  crops (`local`; None = the same strategy as the gradient branch, applied at the crops' size).

  Spec: 'QUERY', 'QUERY|KEY' or 'QUERY|KEY|LOCAL' (the third part only with local crops), e.g. DINO
  'patch8|keep0.5|full': student global views at patch 8, teacher at 50% token keep, local crops at
  full length. The LOCAL part may also set how many of the recipe's local crops the step uses,
  'crops<N>' (N >= 0; the first N, e.g. 'patch8|patch8|full,crops2'): fewer views, not shorter ones
  (`local_crops`; None = all of them)."""
  query: Strategy = FULL
  key: Strategy = FULL
  local: Strategy | None = None
  local_crops: int | None = None

  @classmethod
  def parse(cls, spec: str, bucket: int = 8) -> BranchStrategies:
    """'Q' (key at full length), 'Q|K' or 'Q|K|L' (L may hold 'crops<N>'); raises UserError for
    anything else."""
    parts = str(spec).split("|")
    if len(parts) > 3:
      raise UserError(f"cannot read branch strategies {spec!r}; use 'QUERY', 'QUERY|KEY' or "
                      f"'QUERY|KEY|LOCAL'")
    query = Strategy.parse(parts[0], bucket)
    key = Strategy.parse(parts[1], bucket) if len(parts) >= 2 else FULL
    local, crops = None, None
    if len(parts) == 3:
      tokens = [t.strip() for t in parts[2].lower().split(",")]
      counts = [t for t in tokens if t.startswith("crops")]
      try:
        crops = int(counts[-1][5:]) if counts else None
      except ValueError:
        crops = -1
      if len(counts) > 1 or (crops is not None and crops < 0):
        raise UserError(f"cannot read the local-crop part of {spec!r}: one 'crops<N>' with "
                        f"N >= 0, e.g. 'full,crops2'")
      local = Strategy.parse(",".join(t for t in tokens if not t.startswith("crops")), bucket)
    return cls(query=query, key=key, local=local, local_crops=crops)

  def canonical(self) -> BranchStrategies:
    """The same strategies with an explicit local part equal to the query's dropped: two specs that
    run the same program compare equal."""
    if self.local != self.query or self.local_crops is not None:
      return self
    return dataclasses.replace(self, local=None)

  @property
  def is_full(self) -> bool:
    """Whether every branch runs at full length with all its crops (the uncompressed step)."""
    return self.canonical() == BranchStrategies()

  @property
  def local_strategy(self) -> Strategy:
    """What the local crops run: `local`, or the gradient branch's strategy when unset."""
    return self.query if self.local is None else self.local

  @property
  def spec(self) -> str:
    if self.local is not None:
      crops = "" if self.local_crops is None else f",crops{self.local_crops}"
      return f"{self.query.spec}|{self.key.spec}|{self.local.spec}{crops}"
    return self.query.spec if self.key == FULL else f"{self.query.spec}|{self.key.spec}"

  def layouts(self, image_size: int, base_patch: int) -> tuple[Layout, Layout]:
    """(query, key) layouts; raises a UserError when either cannot apply to the model."""
    return (self.query.layout(image_size, base_patch), self.key.layout(image_size, base_patch))


def parse_checked(spec: str, bucket: int, model_cfg, key: str) -> BranchStrategies:
  """Config-time parse + check against the model; the error names the config key."""
  try:
    strategies = BranchStrategies.parse(spec, bucket)
    strategies.layouts(model_cfg.image_size, model_cfg.patch_size)
  except UserError as e:
    raise UserError(f"{key}={spec!r}: {e}") from None
  return strategies


def full_then_candidates(specs, bucket: int, model_cfg, key: str) -> list[BranchStrategies]:
  """Full length on both branches first (the reference every comparison needs), then each distinct
  candidate of `specs` (config key `key`), checked against the model."""
  out = [BranchStrategies.parse("full|full", bucket)]
  for spec in specs:
    s = parse_checked(spec, bucket, model_cfg, key)
    if s.canonical() not in [o.canonical() for o in out]:
      out.append(s)
  return out


# ------------------------------------------------------------------------------------ PI-resize
def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] matrix of 1-D bilinear resizing with half-pixel centres and edge clamping (what
  jax.image.resize 'linear' computes when upsampling)."""
  m = np.zeros((dst, src), np.float64)
  for i in range(dst):
    c = (i + 0.5) * src / dst - 0.5
    lo = math.floor(c)
    frac = c - lo
    for j, w in ((lo, 1.0 - frac), (lo + 1, frac)):
      m[i, min(max(j, 0), src - 1)] += w
  return m


@functools.lru_cache(maxsize=None)
def pi_resize_matrix(base: int, new: int) -> np.ndarray:
  """[new*new, base*base] float64 matrix P with w_new = P @ w_base (per channel pair), chosen so that
  <resize(x), w_new> = <x, w_base> for every base-size patch x when upsampling (FlexiViT's
  pseudo-inverse resize): P = pinv(R^T), R the bilinear resize of flattened patches."""
  r1 = _bilinear_matrix(base, new)
  resize = np.kron(r1, r1)                      # [new^2, base^2], acts on row-major patches
  return np.linalg.pinv(resize.T)


def pi_resize_kernel(kernel, new: int):
  """Patch-embedding kernel [b, b, C, D] -> [new, new, C, D], inside the graph (differentiable)."""
  base = kernel.shape[0]
  if new == base:
    return kernel
  p = jnp.asarray(pi_resize_matrix(base, new), kernel.dtype)
  flat = kernel.reshape(base * base, -1)
  return (p @ flat).reshape(new, new, *kernel.shape[2:])


@functools.lru_cache(maxsize=None)
def area_resize_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] float64 matrix of 1-D area (box-filter) downsampling, dst <= src: output cell i is
  the mean of the input over [i*src/dst, (i+1)*src/dst), each input cell weighted by the length it
  overlaps (TF's 'area' resize, PyTorch's adaptive_avg_pool). Rows sum to 1; every column has a
  positive entry because the output cells tile the input; an integer factor k gives k-cell means.
  Exact: overlaps are integers in units of 1/dst of an input cell. Read-only (cached)."""
  if not 1 <= dst <= src:
    raise ValueError(f"area resize needs 1 <= dst <= src, got {src} -> {dst}")
  m = np.zeros((dst, src), np.float64)
  for i in range(dst):
    lo, hi = i * src, (i + 1) * src              # output cell i, in units of 1/dst input cells
    for j in range(lo // dst, -(-hi // dst)):
      overlap = min(hi, (j + 1) * dst) - max(lo, j * dst)
      if overlap > 0:
        m[i, j] = overlap / src
  m.flags.writeable = False
  return m


def resize_pos_embed(pos_embed, grid: int):
  """Learned position-embedding grid [L, g*g, D] -> [L, grid*grid, D] (L is 1 for the model's
  parameter; row-major grid), in pos_embed's dtype, differentiable; `grid` is a static int.

  - grid == g: `pos_embed` itself (identity, no op in the graph).
  - grid > g (upsampling): bilinear with half-pixel centres, `jax.image.resize(..., 'linear',
    antialias=False)`, exactly as before.
  - grid < g (downsampling): area averaging (`area_resize_matrix` along rows, then columns), so
    every learned vector has non-zero weight in the output and gets a gradient from every
    shrunken view. Plain bilinear samples the source at only two points per output cell and skips
    the rest whenever the factor exceeds 2: 14 -> 6 (DINO's 96 px local crops at patch 16) leaves
    rows / columns 2, 4, 9, 11 out (96 of 196 vectors without gradient), 14 -> 5 leaves 96 out,
    14 -> 3 (96 px crops at patch 32) 160, 8 -> 2 48. At an exact factor 2, area averaging is
    bilinear's 2x2 mean, so that case gives the same values as before (to float rounding).

  Source: FlexiViT (Beyer et al. 2023, big_vision/models/proj/flexi/vit.py) resizes its learned
  position embedding to the runtime grid with `jax.image.resize(..., "linear")`, whose default
  antialias=True widens the triangle filter by the shrink factor when downsampling, reaching every
  vector; DINO interpolates bicubically (PyTorch, align_corners=False), which also reaches every
  vector at its 14 -> 6 local-crop grid. (big_vision's `vit.resample_posemb`, used when loading a
  checkpoint at a new resolution, is `scipy.ndimage.zoom(order=1)` outside the graph.) Area
  averaging rather than antialiased bilinear: both give every source vector non-zero weight for
  every grid, but antialiased bilinear at factor 2 weights the inputs (1, 3, 3, 1) / 8 ((3, 3, 1)
  / 7 at the edges) instead of the 2x2 mean, which would change the factor-2 downsampling (e.g.
  patch 2x base, resolution halved) that the recipes' schedules use most.
  """
  lead, n, d = pos_embed.shape
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"position embedding has {n} vectors, not a square grid")
  if grid < 1:
    raise ValueError(f"position-embedding grid {grid} must be positive")
  if g == grid:
    return pos_embed
  img = pos_embed.reshape(lead, g, g, d)
  if grid > g:
    img = jax.image.resize(img, (lead, grid, grid, d), method="linear", antialias=False)
  else:
    a = jnp.asarray(area_resize_matrix(g, grid), pos_embed.dtype)
    hi = jax.lax.Precision.HIGHEST   # as jax.image.resize: no reduced-precision passes on GPU/TPU
    img = jnp.einsum("ij,ljkd->likd", a, img, precision=hi)
    img = jnp.einsum("mk,likd->limd", a, img, precision=hi)
  return img.reshape(lead, grid * grid, d)


# ----------------------------------------------------------------------------------- token keep
def keep_indices(rng, batch: int, num_patches: int, kept: int):
  """[batch, kept] distinct patch indices per sample, uniform at random (noise -> argsort)."""
  noise = jax.random.uniform(rng, (batch, num_patches))
  return jnp.argsort(noise, axis=1)[:, :kept]


def gather_rows(x, idx):
  """x [B, N, ...] -> [B, K, ...]: row idx[b, k] of sample b (idx [B, K] int, e.g. keep_indices)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def keep_tokens(tokens, rng, kept: int):
  """Patch tokens [B, N, D] -> [B, kept, D], a random subset per sample (CLS is added later).

  The definition of token keep. The ViT applies it earlier, to the raw patches before the patch
  embedding and to the position embeddings (`VisionTransformer.tokens`): the same tokens, since
  both are per patch, without embedding the dropped patches (the pixels' gather needs no
  backward; the position embeddings' is per sample, as here)."""
  b, n, _ = tokens.shape
  if kept >= n:
    return tokens
  return gather_rows(tokens, keep_indices(rng, b, n, kept))


# ----------------------------------------------------------------------------------- cost model
def backbone_forward_flops(model_cfg, layout: Layout, channels: int = 3) -> float:
  """FLOPs (2 per multiply-add) of one backbone forward on one sample with this layout: patch
  embedding charged over all patches (the ViT embeds only the kept ones: at 25% keep the extra
  charge is ~2% of this forward for the embedded default and ViT-B/16, ~4% for ViT-S/16; it stays
  so that budgets and step plans remain comparable with the runs already measured), then
  `depth` blocks at seq_len tokens (QKV + output projections, the attention's quadratic term, the
  MLP)."""
  w = model_cfg.width
  mlp = int(w * model_cfg.mlp_ratio)
  embed = 2.0 * layout.num_patches * layout.patch_size ** 2 * channels * w
  n = layout.seq_len
  per_block = 2.0 * n * (4 * w * w + 2 * w * mlp) + 2.0 * 2 * n * n * w
  return embed + model_cfg.depth * per_block


def mlp_flops(dims) -> float:
  """FLOPs of a chain of dense layers through `dims` (e.g. [128, 1024, 1024, 256])."""
  return float(sum(2.0 * a * b for a, b in zip(dims[:-1], dims[1:])))


@dataclasses.dataclass(frozen=True)
class Branch:
  """One pass of one view through (part of) the network within a train step."""
  layout: Layout
  head_flops: float   # projector / predictor FLOPs per sample on this branch
  with_grad: bool     # forward + backward (~3 forwards) vs forward only


def base_forward_flops(model_cfg) -> float:
  full = FULL.layout(model_cfg.image_size, model_cfg.patch_size)
  return backbone_forward_flops(model_cfg, full)


def branches_cost_units(model_cfg, branches) -> float:
  """Per-sample cost of a train step in base-forward units: the sum over its branches, each a
  forward (no gradient) or forward + backward (~3x forward)."""
  unit = base_forward_flops(model_cfg)
  total = 0.0
  for br in branches:
    flops = backbone_forward_flops(model_cfg, br.layout) + br.head_flops
    total += (3.0 if br.with_grad else 1.0) * flops
  return total / unit
