"""The learning-rate schedule on budget progress (optimizer.learning_rate_at) against its closed forms:
linear warm-up, then cosine or polynomial decay to lr_end_factor x peak."""
import math

import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from vit_accel import config_domains, optimizer
from vit_accel.errors import UserError

PEAK = 2e-3 * 512 / 256     # base_lr x batch / 256
END = 0.1 * PEAK            # lr_end_factor x peak
WARMUP = 0.2


def config(**optim):
  c = ml_collections.ConfigDict()
  c.batch_size = 512
  c.optim = ml_collections.ConfigDict(dict(base_lr=2e-3, warmup_fraction=WARMUP,
                                           lr_end_factor=0.1, **optim))
  return c


def lr(c, progress):
  return float(optimizer.learning_rate_at(c, progress))


def closed_form(progress, decay, power=2.0):
  if progress < WARMUP:
    return PEAK * progress / WARMUP
  t = min((progress - WARMUP) / (1 - WARMUP), 1.0)
  shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else (1 - t) ** power
  return END + (PEAK - END) * shape


POINTS = (0.0, 0.1, WARMUP, 0.3, 0.5, 0.6, 0.9, 0.99, 1.0)


@pytest.mark.parametrize("decay,power", [("cosine", 2.0), ("polynomial", 2.0),
                                         ("polynomial", 1.0), ("polynomial", 0.5)])
def test_decay_matches_its_closed_form(decay, power):
  c = config(decay=decay, decay_power=power)
  for p in POINTS:
    assert lr(c, p) == pytest.approx(closed_form(p, decay, power), rel=1e-5, abs=1e-9), p
  assert lr(c, WARMUP) == pytest.approx(PEAK)          # warm-up ends at the peak
  assert lr(c, 1.0) == pytest.approx(END)              # the budget ends at end
  assert lr(c, 1.5) == pytest.approx(END)              # clipped past the budget
  tail = [lr(c, p) for p in np.linspace(WARMUP, 1.0, 40)]
  assert np.all(np.diff(tail) <= 1e-9)
  # The train step evaluates it on a traced progress.
  traced = jax.jit(lambda p: optimizer.learning_rate_at(c, p))
  assert float(traced(0.6)) == pytest.approx(lr(c, 0.6), rel=1e-6)


def test_polynomial_power_two_values():
  """Half-way through the decay (1 - t)^2 = 1/4, cosine's 1/2; a quarter in, 9/16 vs 0.854."""
  poly, cos = config(decay="polynomial", decay_power=2.0), config(decay="cosine")
  half, quarter = WARMUP + 0.5 * (1 - WARMUP), WARMUP + 0.25 * (1 - WARMUP)
  assert lr(poly, half) == pytest.approx(END + (PEAK - END) / 4, rel=1e-5)
  assert lr(cos, half) == pytest.approx(END + (PEAK - END) / 2, rel=1e-5)
  assert lr(poly, quarter) == pytest.approx(END + (PEAK - END) * 9 / 16, rel=1e-5)
  assert lr(poly, half) < lr(cos, half)


def test_cosine_is_the_default_and_unknown_decays_are_refused():
  assert lr(config(), 0.6) == pytest.approx(closed_form(0.6, "cosine"), rel=1e-5)  # no key
  with pytest.raises(ValueError, match="optim.decay='linear'"):
    lr(config(decay="linear"), 0.5)


def test_recipe_keys_and_their_domains():
  c = base.get_config()
  assert (c.optim.decay, c.optim.decay_power) == ("cosine", 2.0)
  c.optim.decay = "polynomial"
  config_domains.check(c)
  assert float(optimizer.learning_rate_at(c, 1.0)) == pytest.approx(
      c.optim.base_lr * c.batch_size / 256 * c.optim.lr_end_factor, abs=1e-12)
  c.optim.decay = "step"
  with pytest.raises(UserError, match=r"^optim.decay='step' is out of range: must be one of "
                                      r"'cosine', 'polynomial'$"):
    config_domains.check(c)
  c.optim.decay = "polynomial"
  c.optim.decay_power = 0.0
  with pytest.raises(UserError, match=r"^optim.decay_power=0.0 is out of range: must be a number "
                                      r"> 0$"):
    config_domains.check(c)
