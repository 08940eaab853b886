import os

import ml_collections
import pytest

from vit_accel import xla_flags
from vit_accel.errors import UserError


def test_merged_adds_only_flags_the_environment_does_not_set():
  env = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
  out = xla_flags.merged(env, "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_math=true")
  # The user's own value of a flag wins; a new one is appended; nothing is dropped.
  assert out.split() == ["--xla_force_host_platform_device_count=8",
                         "--xla_cpu_experimental_ynn_fusion_type=dot",
                         "--xla_cpu_enable_fast_math=true"]
  assert xla_flags.merged("", "") == ""
  assert xla_flags.merged("", "--xla_cpu_experimental_ynn_fusion_type=") == \
      "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.parametrize("bad", ["--xla_gpu_enable_triton_gemm=false", "xla_cpu_foo=1", "-x"])
def test_merged_rejects_what_is_not_an_xla_cpu_flag(bad):
  with pytest.raises(UserError, match="xla_cpu_flags"):
    xla_flags.merged("", bad)


def test_apply_sets_the_environment(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  config = ml_collections.ConfigDict({"xla_cpu_flags": "--xla_cpu_experimental_ynn_fusion_type="})
  xla_flags.apply(config)
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     "--xla_cpu_experimental_ynn_fusion_type=")
