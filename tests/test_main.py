"""Bad command lines end with one `error:` line and exit code 2, before anything compiles, and leave
an existing run directory untouched."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/fmnist_mocov3.py:smoke"

CASES = {
    "unknown key": ([SMOKE, "--config.foo=1"], "unknown config key 'foo'"),
    "misspelt key": ([SMOKE, "--config.model.widht=3"], 'Did you mean "width"'),
    "bad value": ([SMOKE, "--config.batch_size=abc"], "batch_size=abc"),
    "unknown recipe arg": (["--config=configs/fmnist_mocov3.py:smok"], "available: smoke"),
    "missing recipe": (["--config=configs/nope.py"], "No such file"),
    "unknown objective": ([SMOKE, "--config.objective=byol"], "unknown objective='byol'"),
    "unknown schedule": ([SMOKE, "--config.schedule=fast"], "schedule='fast'"),
    "compute dtype": ([SMOKE, "--config.model.dtype=float16"],
                      "model.dtype='float16' is out of range: must be one of"),
    "keep ratio": ([SMOKE, "--config.schedule=1:keep1.5"], "keep ratio 1.5 is outside (0, 1]"),
    "patch tiles": ([SMOKE, "--config.model.patch_size=5"], "model.patch_size=5 does not tile"),
    "batch vs mesh": ([SMOKE, "--config.mesh.data=2"], "mesh.data x mesh.fsdp = 2 x 1"),
    "budget too small": ([SMOKE, "--config.budget=10"], "budget=10 units is too small"),
    "missing data": ([SMOKE, "--config.data.dir=/nonexistent"], "dataset-fashion-mnist"),
    "local crop size": (["--config=configs/fmnist_dino.py:smoke", "--config.aug.local_size=10"],
                        "aug.local_size=10 must be a positive multiple of model.patch_size=4"),
    "unknown data source": ([SMOKE, "--config.data.source=lmdb"], "unknown data.source='lmdb'"),
    "image folder missing": ([SMOKE, "--config.data.source=image_folder",
                              "--config.data.dir=/nonexistent"], "/nonexistent/train does not exist"),
    "tfds not prepared": ([SMOKE, "--config.data.source=tfds", "--config.data.tfds_name=cifar10",
                           "--config.data.dir=/nonexistent"], "'cifar10' is not prepared"),
    "cluster half-specified": ([SMOKE, "--config.distributed.coordinator_address=127.0.0.1:1"],
                               "needs distributed.num_processes > 0"),
    "init step without a source": ([SMOKE, "--config.init.checkpoint_step=3"],
                                   "init.checkpoint_step=3 needs init.workdir"),
}


def test_a_fresh_run_from_a_missing_source_is_one_line_and_creates_nothing(tmp_path):
  """init.workdir is read only by a fresh run (a resume never reads it): its errors come before
  the new run's directory exists."""
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", SMOKE,
                         "--config.init.workdir=/nonexistent/run", "--logtostderr",
                         "--verbosity=-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "init.workdir='/nonexistent/run' holds no checkpoints/" in errors[0], errors[0]
  assert not workdir.exists()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_the_run_directory_is_untouched(name, tmp_path):
  args, expected = CASES[name]
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "checkpoints" / "7" / "marker").write_text("saved work")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *args, "--logtostderr",
                         "--verbosity=-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert expected in errors[0], errors[0]
  assert sorted(os.listdir(workdir)) == ["checkpoints"]
  assert (workdir / "checkpoints" / "7" / "marker").read_text() == "saved work"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_unreadable_image_fails_naming_the_file_or_is_skipped_and_counted(policy, tmp_path):
  from test_sources import make_image_folder
  data = make_image_folder(str(tmp_path / "data"), per_class=(12, 4))
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "checkpoints" / "7" / "marker").write_text("saved work")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  # --mode=eval reads the data, then finds no checkpoint it can use: the run directory is only read.
  proc = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", SMOKE, "--mode=eval",
                         "--config.data.source=image_folder", f"--config.data.dir={data}",
                         f"--config.data.bad_images={policy}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  if policy == "fail":
    assert len(errors) == 1 and "broken.png is not a readable image" in errors[0], errors
  else:
    assert "skipped 1 of 37 files that are not readable images" in proc.stderr
    assert "1 non-image file(s)" in proc.stderr and "notes.txt" in proc.stderr
  assert (workdir / "checkpoints" / "7" / "marker").read_text() == "saved work"
