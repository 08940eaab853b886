"""Named augmentation recipes: the `config.aug` blocks of the published methods, as ConfigDicts.

Strengths follow the papers (ImageNet at 224 px); blur sigma is scaled to the dataset's image side
(`image_size / 224`), since a 2-pixel blur means something else on a 32 px image. Colour-only ops
(saturation, hue, greyscale) are no-ops on grey images. No TensorFlow here: configs import this.

  simclr(s)        SimCLR: crop 0.08-1, flip, colour jitter 0.8s/0.8s/0.8s/0.2s with p 0.8,
                   greyscale p 0.2, blur p 0.5 on both views
  byol_asymmetric  BYOL / MoCo-v3: jitter 0.4/0.4/0.2/0.1 p 0.8, greyscale 0.2, blur 1.0 vs 0.1,
                   solarise 0 vs 0.2
  dino_multicrop   DINO: BYOL-style global crops at scale 0.4-1 (blur 1.0 / 0.1, solarise 0 / 0.2)
                   plus `local_crops` crops at scale 0.05-0.4, `local_size` px, blur 0.5
"""
from __future__ import annotations

import ml_collections


def defaults(image_size: int = 224) -> ml_collections.ConfigDict:
  """Every `config.aug` key (the one place they are defined), at BYOL / MoCo-v3 strengths without
  blur or solarisation; `image_size` (px) scales the blur sigma range."""
  a = ml_collections.ConfigDict()
  a.crop_scale = (0.08, 1.0)  # area fraction of the image a (global) crop covers
  a.crop_ratio = (3 / 4, 4 / 3)  # aspect ratio range of a crop
  a.flip = True
  a.downscale = "antialias"  # shrinking a crop: 'antialias' (PIL) | 'area' | 'bilinear'
  a.jitter_p = 0.8           # colour jitter probability per view
  a.brightness = 0.4
  a.contrast = 0.4
  a.saturation = 0.2
  a.hue = 0.1
  a.grayscale_p = 0.2
  a.blur_sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)  # Gaussian blur sigma, px
  a.blur_p = (0.0, 0.0)      # per global view
  a.solarize_p = (0.0, 0.0)  # per global view
  a.local_crops = 0          # DINO multi-crop: local crops per image (0 = two views only)
  a.local_size = 0           # ... their side, px
  a.local_crop_scale = (0.05, 0.4)
  a.local_blur_p = 0.5
  return a


def simclr(strength: float = 1.0, image_size: int = 224) -> ml_collections.ConfigDict:
  a = defaults(image_size)
  a.brightness = a.contrast = a.saturation = 0.8 * strength
  a.hue = 0.2 * strength
  a.blur_p = (0.5, 0.5)
  return a


def byol_asymmetric(image_size: int = 224) -> ml_collections.ConfigDict:
  a = defaults(image_size)
  a.blur_p = (1.0, 0.1)
  a.solarize_p = (0.0, 0.2)
  return a


def dino_multicrop(image_size: int = 224, local_crops: int = 8, local_size: int = 96,
                   global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)) -> ml_collections.ConfigDict:
  a = byol_asymmetric(image_size)
  a.crop_scale = tuple(global_scale)
  a.local_crops = local_crops
  a.local_size = local_size
  a.local_crop_scale = tuple(local_scale)
  a.local_blur_p = 0.5
  return a
