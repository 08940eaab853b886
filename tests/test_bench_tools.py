"""The benchmarks' shared pieces and their CPU code paths (bench/child.py, bench/gpu.py --tiny,
bench/cpu_peer.py --tiny, bench/pipeline.py's case parsing)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import child  # noqa: E402  (bench/child.py)


def test_child_returns_the_last_result_line_or_the_error_line():
  script = "import child; print('RESULT {\"x\": 0}'); child.emit({'x': 1, 'ok': True}); print('bye')"
  got = child.run([sys.executable, "-c", script], cwd=os.path.join(ROOT, "bench"))
  assert got == {"x": 1, "ok": True}
  failed = child.run([sys.executable, "-c", "import sys; print('hello'); sys.exit('boom: no GPU')"])
  assert failed == "boom: no GPU"
  assert child.run([sys.executable, "-c", "pass"]) == "no output"
  assert child.run(["/nonexistent/python", "-c", "pass"]).startswith("cannot start /nonexistent")


@pytest.mark.slow
def test_gpu_benchmark_code_paths_run_on_cpu(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = str(tmp_path / "gpu")
  subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--nopeer", "--repeats=5",
                  f"--out_dir={out}"], cwd=ROOT, env=env, check=True, capture_output=True)
  with open(os.path.join(out, "gpu_cpu_tiny.json")) as f:
    results = json.load(f)
  for block in results["models"]:
    assert not block.get("error"), block["error"]
    assert block["rows"][0]["strategy"] == "full" and len(block["rows"]) >= 3
    assert all(r["ms_per_step"] > 0 for r in block["rows"])
  # The XLA-flag A/B: each set in its own process, the default always, a table of both.
  subprocess.run([sys.executable, "bench/gpu.py", "--xla_ab", "--tiny", "--repeats=5",
                  "--xla_sets=no_triton_gemm", f"--out_dir={out}"], cwd=ROOT, env=env,
                 check=True, capture_output=True)
  with open(os.path.join(out, "gpu_xla_flags_cpu_tiny.json")) as f:
    sets = json.load(f)
  assert [s["set"] for s in sets] == ["default", "no_triton_gemm"]
  assert all(s["ms_per_step"] > 0 and len(s["runs"]) == 2 for s in sets)
  bad = subprocess.run([sys.executable, "bench/gpu.py", "--xla_ab", "--tiny", "--xla_sets=fast",
                        f"--out_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode != 0 and "unknown ['fast']" in bad.stderr


@pytest.mark.slow
def test_cpu_peer_times_ours_with_and_without_xla_flags(tmp_path):
  """bench/cpu_peer.py --tiny: our step in its own process, again under --ours_xla_flags, and a
  peer that cannot run (no such Python) reported as such rather than failing the bench."""
  out = str(tmp_path / "peer")
  subprocess.run([sys.executable, "bench/cpu_peer.py", "--tiny", "--rounds=1", "--repeats=2",
                  "--peer_python=/nonexistent/python", f"--out_dir={out}",
                  "--ours_xla_flags=--xla_cpu_enable_fast_math=false"], cwd=ROOT, check=True,
                 capture_output=True)
  with open(os.path.join(out, "cpu_peer_tiny.json")) as f:
    res = json.load(f)
  for timing in (res["ours"], res["ours_flagged"]):
    assert set(timing) == {"full", "keep0.25|keep0.25"} and all(v > 0 for v in timing.values())
  assert res["peer_error"] and not res["peer"]
  with open(os.path.join(out, "cpu_peer_tiny.md")) as f:
    text = f.read()
  assert "ours + flags ms/step" in text and "--xla_cpu_enable_fast_math=false" in text


def test_cpu_peer_products_are_the_steps_matmuls_with_their_counts():
  """bench/cpu_peer.py --products: every dense product of the symmetric MoCo-v3 step on the
  embedded default's ViT (w128 d4, MLP 512, patch 4 on 32 px; heads 1024 -> 256), with how often
  the step runs it, and the per-step sums of its report."""
  import cpu_peer  # bench/cpu_peer.py
  shapes = cpu_peer.product_shapes(cpu_peer.model_spec(tiny=False), batch=8)
  fwd2, grad = (("fwd", 16), ("dx", 8), ("dw", 8)), (("fwd", 4), ("dx", 2), ("dw", 2))
  want = {}
  for strategy, tokens in (("full", 65), ("keep0.25|keep0.25", 17)):
    m = 8 * tokens   # kept patches (the model's bucket-rounded count) + CLS
    for name, k, n in (("qkv", 128, 384), ("attn_out", 128, 128), ("mlp_in", 128, 512),
                       ("mlp_out", 512, 128)):
      want.update({(strategy, name, kind): (m, k, n, count) for kind, count in fwd2})
    # ours embeds the kept patches only (timm every patch: the peer reads the batch instead)
    want[(strategy, "patch_embed", "fwd")] = (8 * (tokens - 1), 48, 128, 4)
    want[(strategy, "patch_embed", "dw")] = (8 * (tokens - 1), 48, 128, 2)
    for name, k, n in (("proj_fc0", 128, 1024), ("proj_fc1", 1024, 1024),
                       ("proj_fc2", 1024, 256)):
      want.update({(strategy, name, kind): (8, k, n, count) for kind, count in grad})
    for name, k, n in (("pred_fc0", 256, 1024), ("pred_fc1", 1024, 256)):   # online branch only
      want.update({(strategy, name, kind): (8, k, n, 2) for kind in ("fwd", "dx", "dw")})
  got = {(p["strategy"], p["name"], p["kind"]): (p["m"], p["k"], p["n"], p["per_step"])
         for p in shapes}
  assert got == want and len(shapes) == len(want)
  parts = {p["name"]: p["part"] for p in shapes}
  assert parts == {"qkv": "blocks", "attn_out": "blocks", "mlp_in": "blocks", "mlp_out": "blocks",
                   "patch_embed": "patch_embed", "proj_fc0": "heads", "proj_fc1": "heads",
                   "proj_fc2": "heads", "pred_fc0": "heads", "pred_fc1": "heads"}
  # Our operands multiply to the product's output: fwd -> [m, n], dx -> [m, k], dw -> [k, n].
  import numpy as np
  ops = {"fwd": lambda a, b: a @ b, "dx": lambda a, b: a @ b.T, "dw": lambda a, b: a.T @ b}
  for p in shapes[:30]:
    a, b = cpu_peer.product_operands(p, p["n"])
    out = {"fwd": (p["m"], p["n"]), "dx": (p["m"], p["k"]), "dw": (p["k"], p["n"])}[p["kind"]]
    assert ops[p["kind"]](np.zeros(a, np.float32), np.zeros(b, np.float32)).shape == out
  assert {p["name"] for p in shapes if p["ours_parts"] == 3} == {"qkv"}   # q, k, v: three in ours
  assert all(p["ours_parts"] == 1 for p in shapes if p["name"] != "qkv")

  # The report: each product weighted by its count, per part and in all.
  res = {"machine": "m", "date": "d", "command": "c", "model": "vit", "batch": 8, "repeats": 1,
         "rounds": 1, "shapes": shapes, "peer_versions": "torch", "peer_error": None,
         "ours": {cpu_peer.product_key(p): 1.0 for p in shapes},
         "peer": {cpu_peer.product_key(p): 2.0 for p in shapes}}
  text = cpu_peer.products_markdown(res)
  blocks = sum(count for (s, name, _), (*_, count) in want.items()
               if s == "full" and name in ("qkv", "attn_out", "mlp_in", "mlp_out"))
  total = sum(count for (s, _, _), (*_, count) in want.items() if s == "full")
  assert f"| full | blocks | {blocks:.1f} | {2 * blocks:.1f} | {-blocks:+.1f} |" in text
  assert f"| full | all | {total:.1f} | {2 * total:.1f} | {-total:+.1f} |" in text
  assert f"| keep0.25\\|keep0.25 | all | {total:.1f} |" in text
  assert "| full | qkv | dw | 520 x 128 x 384 | 8 | 1.00 | 2.00 | 2.00x |" in text
  heads = sum(count for (s, name, _), (*_, count) in want.items()
              if s == "full" and name.startswith(("proj", "pred")))
  assert f"| full | heads | {heads:.1f} | {2 * heads:.1f} | {-heads:+.1f} |" in text
  assert "| full | patch_embed | 6.0 | 12.0 | -6.0 |" in text


def test_cpu_peer_times_our_qkv_as_three_projections(monkeypatch):
  """Ours runs q, k, v as three [k, n / 3] products: one is timed, at n / 3 columns, and counted
  three times; every other product once, at its own width."""
  import cpu_peer  # bench/cpu_peer.py
  # products_ours sets the recipe's XLA_FLAGS in os.environ; restored after this test.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  shapes = [p for p in cpu_peer.product_shapes(cpu_peer.model_spec(tiny=True), batch=2)
            if p["strategy"] == "full" and p["kind"] == "fwd"]
  widths = []

  def fake_timer(fn, repeats):
    widths.append(fn().shape[-1])
    return 1.0
  got = cpu_peer.products_ours(shapes, repeats=1, timer=fake_timer)
  assert got["full qkv fwd"] == 3.0 and got["full attn_out fwd"] == 1.0
  assert widths[0] == 32 and widths[1] == 32   # qkv at 96 / 3 columns; attn_out at its 32


@pytest.mark.slow
def test_cpu_peer_products_run_in_their_own_process(tmp_path):
  """The --products run end to end (tiny): ours timed in a child, a peer that cannot start
  reported as such, and --ours_xla_flags refused with an error line."""
  out = str(tmp_path / "products")
  subprocess.run([sys.executable, "bench/cpu_peer.py", "--tiny", "--products", "--rounds=1",
                  "--repeats=2", "--peer_python=/nonexistent/python", f"--out_dir={out}"],
                 cwd=ROOT, check=True, capture_output=True)
  with open(os.path.join(out, "cpu_peer_products_tiny.json")) as f:
    res = json.load(f)
  import cpu_peer  # bench/cpu_peer.py
  assert set(res["ours"]) == {cpu_peer.product_key(p) for p in res["shapes"]}
  assert all(v > 0 for v in res["ours"].values())
  assert res["peer_error"].startswith("cannot start") and not res["peer"]
  bad = subprocess.run([sys.executable, "bench/cpu_peer.py", "--tiny", "--products",
                        "--ours_xla_flags=--xla_cpu_enable_fast_math=false"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --products")


def test_child_that_hangs_is_stopped_and_reported():
  assert child.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1) == \
      "timed out after 1 s"


def test_pipeline_bench_variants_are_checked_config_overrides():
  import pipeline as pipeline_bench  # bench/pipeline.py
  got = pipeline_bench.parse_variant("aug.downscale=area,data.prefetch=8")
  assert got == {"aug.downscale": "area", "data.prefetch": 8}
  assert pipeline_bench.parse_variant("aug.crop_scale=(0.2,1.0),aug.flip=False") == {
      "aug.crop_scale": (0.2, 1.0), "aug.flip": False}
  for bad in ("aug.downscale=lanczos", "aug.nothing=1", "aug.downscale", "batch_size=8",
              "data.verify_images=False"):
    with pytest.raises(ValueError):
      pipeline_bench.parse_variant(bad)


def test_a_starred_wall_comes_with_its_legend_and_only_then():
  import sweep_runs
  alone = {"train_wall_s": 100.0, "load_avg_1m": 2.1}
  loaded = {"train_wall_s": 100.0, "load_avg_1m": 2.6}
  marked = {"train_wall_s": 100.0, "load_avg_1m": 0.5, "cpu_shared": True}
  assert sweep_runs.wall(alone) == "100 s" and sweep_runs.shared_legend([alone]) == []
  for shared in (loaded, marked):
    assert sweep_runs.wall(shared) == "100 s*"
    legend = sweep_runs.shared_legend([alone, shared])
    assert legend[0] == "" and legend[1].startswith("\\* wall-clock inflated")
    assert "read from" not in legend[1]
  assert "read from" in sweep_runs.shared_legend([marked], derived=True)[1]


def test_an_arm_is_judged_against_the_preset_on_the_seeds_both_ran():
  from schedule_comparison import paired_verdict
  preset = {0: 0.80, 1: 0.79, 2: 0.77}
  # all three seeds in common: the means over three
  three = paired_verdict({0: 0.78, 1: 0.78, 2: 0.76}, preset, noise=0.03)
  assert three["diff_seeds"] == [0, 1, 2] and three["every_seed"]
  assert three["diff"] == pytest.approx(0.7733333 - 0.7866667, abs=1e-6)
  assert three["verdict"] == "within noise"
  # an arm without the third seed is compared on seeds 0 and 1 only, not with the 3-seed mean
  two = paired_verdict({0: 0.74, 1: 0.75}, preset, noise=0.03)
  assert two["diff_seeds"] == [0, 1] and two["diff"] == pytest.approx(-0.05)
  assert two["verdict"] == "below" and not two["every_seed"]   # the preset has seed 2 too
  # the arm's extra seed is left out of the difference, and the report must say so
  extra = paired_verdict({0: 0.80, 1: 0.79, 2: 0.77, 3: 0.70}, preset, noise=0.03)
  assert extra["diff"] == pytest.approx(0.0) and not extra["every_seed"]
  assert paired_verdict({0: 0.74, 1: 0.75}, {0: 0.80, 1: 0.79}, noise=0.03)["every_seed"]
  assert paired_verdict({0: 0.84, 1: 0.83}, preset, noise=0.03)["verdict"] == "above"
  assert paired_verdict({0: 0.84, 1: 0.83}, preset, noise=0.05)["verdict"] == "within noise"
  one = paired_verdict({1: 0.70, 5: 0.90}, preset, noise=0.03)
  assert one["diff"] == pytest.approx(-0.09) and one["verdict"] == "one seed in common: no verdict"
  assert paired_verdict({0: 0.78, 1: 0.78}, preset, noise=None)["verdict"] == "noise not measured"
  none = paired_verdict({7: 0.78}, preset, noise=0.03)
  assert "diff" not in none and none["verdict"] == "no seed in common"


def test_the_report_compares_each_arm_on_its_own_seeds_and_says_which(tmp_path):
  """A preset and an online arm with a third seed, a baseline with two and a searched arm with
  one: each arm's difference is over the seeds it shares with the preset, the noise over every
  seed of a fixed arm, and the table names the seeds where they are not all of both."""
  import schedule_comparison as sc
  import sweep_runs
  from absl.testing import flagsaver
  if not sc.FLAGS.is_parsed():
    sc.FLAGS(["schedule_comparison"])
  settings = {"baseline": (0.002, 64), "compressed": (0.001, 64)}
  arms = [("baseline", "none"), ("accelerated", "recipe"), ("searched", "pilot"),
          ("online", "online")]
  knn = {"baseline": {0: 0.73, 1: 0.72}, "accelerated": {0: 0.79, 1: 0.79, 2: 0.77},
         "searched": {1: 0.75}, "online": {0: 0.78, 1: 0.77, 2: 0.78}}
  records = [{"key": sc.run_key(arm, 4.0, *settings["baseline" if arm == "baseline"
                                                    else "compressed"], seed),
              "arm": arm, "schedule": dict(arms)[arm], "seed": seed, "final_knn": value,
              "stages": ["full x10"], "why": [], "train_wall_s": 10.0,
              "rules_version": sweep_runs.RULES_VERSION}
             for arm, by_seed in knn.items() for seed, value in by_seed.items()]
  with flagsaver.flagsaver(budgets=["4"], seeds=["0", "1", "2"], extra=[], arm_overrides=[]):
    (row,) = sc.compare(records, arms, settings)
    sc.report(records, arms, settings, str(tmp_path / "report"),
              type("NoWorkdirs", (), {"workdir": lambda self, key: str(tmp_path / key)})())
  assert row["noise"] == pytest.approx(0.02)   # the preset's three seeds, not the baseline's 0.01
  e = row["arms"]
  assert e["online"]["diff_seeds"] == [0, 1, 2]
  assert e["online"]["diff"] == pytest.approx(-0.02 / 3) and e["online"]["verdict"] == "within noise"
  assert e["baseline"]["diff_seeds"] == [0, 1] and e["baseline"]["diff"] == pytest.approx(-0.065)
  assert e["baseline"]["verdict"] == "below"
  assert e["searched"]["diff"] == pytest.approx(-0.04)
  assert e["searched"]["verdict"] == "one seed in common: no verdict"
  cells = {line.split(" | ")[1]: line.split(" | ")[4] for line in
           (tmp_path / "report.md").read_text().splitlines() if line.startswith("| 4 |")}
  assert cells == {"baseline": "-0.0650 (s0, s1)", "accelerated": "", "searched": "-0.0400 (s1)",
                   "online": "-0.0067"}


def test_a_measured_arm_resumes_only_a_workdir_of_its_own_rules(tmp_path):
  import sweep_runs
  fresh = tmp_path / "fresh"
  sweep_runs.check_rules_version(str(fresh), "pilot")
  assert (fresh / "rules_version").read_text().strip() == str(sweep_runs.RULES_VERSION)
  (fresh / "pilot_cost.json").write_text("{}")
  sweep_runs.check_rules_version(str(fresh), "pilot")          # its own: resumes
  old = tmp_path / "old"
  old.mkdir()
  (old / "pilot_cost.json").write_text("{}")        # written before versions were kept
  with pytest.raises(SystemExit, match=r"error: .*old holds a run chosen under schedule rules "
                                       r"version 1"):
    sweep_runs.check_rules_version(str(old), "pilot")
  assert sorted(os.listdir(old)) == ["pilot_cost.json"]   # nothing written or moved
  # A version whose rules for this schedule are this code's resumes; for another schedule it
  # is refused.
  assert sweep_runs.MEASURED_SAME_AS
  for schedule, same in sweep_runs.MEASURED_SAME_AS.items():
    for version in same:
      (old / "rules_version").write_text(f"{version}\n")
      sweep_runs.check_rules_version(str(old), schedule)
      other = next(s for s in sweep_runs.MEASURED if s != schedule)
      with pytest.raises(SystemExit, match=rf"rules version {version}, this code's"):
        sweep_runs.check_rules_version(str(old), other)
  assert not sweep_runs.same_rules({"schedule": "pilot"})
  assert sweep_runs.same_rules({"schedule": "dynamic"})
  assert sweep_runs.same_rules({"schedule": "online", "rules_version": sweep_runs.RULES_VERSION})


def test_a_run_of_older_rules_counts_only_where_it_measured_nothing():
  import sweep_runs
  older = next(v for v, same in sweep_runs.UNMEASURED_SAME_AS.items()
               if same == sweep_runs.RULES_VERSION)
  skipped = {"schedule": "pilot", "rules_version": older, "pilot_rounds": 0}
  assert sweep_runs.same_rules(skipped)
  assert not sweep_runs.same_rules(dict(skipped, pilot_rounds=2))        # it measured and chose
  assert not sweep_runs.same_rules(dict(skipped, rules_version=1))       # an incompatible version
  unmeasured = ["at 0%: the prior's patch8|patch8, unmeasured: too few batches",
                "at 60%: the prior's keep0.5|keep0.5, unmeasured: too few batches",
                "the last segment runs at full length (search.final_full)"]
  online = {"schedule": "online", "rules_version": older, "why": unmeasured}
  assert sweep_runs.same_rules(online)
  measured = unmeasured[:1] + ["at 20%: lowest CA-MSE keep0.5|keep0.5 0.8281 [0.68, 1.77]"]
  assert not sweep_runs.same_rules(dict(online, why=measured))
  assert not sweep_runs.same_rules(dict(online, why=[]))
  # A version whose rules for one schedule are this code's: its measured runs of that schedule
  # count, those of another schedule do not.
  assert sweep_runs.MEASURED_SAME_AS
  for schedule, same in sweep_runs.MEASURED_SAME_AS.items():
    for version, now in same.items():
      assert now == sweep_runs.RULES_VERSION
      chose = {"schedule": schedule, "rules_version": version, "pilot_rounds": 2, "why": measured}
      assert sweep_runs.same_rules(chose)
      other = next(s for s in sweep_runs.MEASURED if s != schedule)
      assert not sweep_runs.same_rules(dict(chose, schedule=other))


def test_a_kept_pilot_is_resumed_only_with_its_own_warm_start(tmp_path):
  """sweep_runs.check_warm_start: a pilot kept from a run with the other pilot.warm_start is refused
  (it would record a run from random weights as warm-started, or the reverse)."""
  import sweep_runs
  cold, warm = {"warm_start": False, "init_workdir": None}, {"warm_start": True,
                                                             "init_workdir": "/r/pilot"}
  sweep_runs.check_warm_start(str(tmp_path), cold, {})
  sweep_runs.check_warm_start(str(tmp_path), warm, {"pilot.warm_start": "True"})
  sweep_runs.check_warm_start(str(tmp_path), {}, {"pilot.warm_start": "false"})  # an older pilot
  sweep_runs.check_warm_start(str(tmp_path), {"init_workdir": "/r/pilot"},   # ...a warm one
                              {"pilot.warm_start": "True"})
  with pytest.raises(SystemExit, match=r"error: .* holds a pilot of pilot.warm_start=False, this "
                                       r"arm asks for True"):
    sweep_runs.check_warm_start(str(tmp_path), cold, {"pilot.warm_start": "True"})
  with pytest.raises(SystemExit, match=r"pilot.warm_start=True, this arm asks for False"):
    sweep_runs.check_warm_start(str(tmp_path), warm, {})


def test_gradient_error_groups_partition_the_parameters_and_sum_to_the_whole():
  """bench/grad_error_by_group.py: every parameter in exactly one group, the groups' bias^2 sum
  to the whole vector's noise-corrected bias^2 (grad_error.gram_terms), and a group the candidate
  leaves untouched shows no bias and cosine 1."""
  import grad_error_by_group as by_group  # bench/grad_error_by_group.py
  import jax.numpy as jnp
  import numpy as np

  from vit_accel import grad_error
  params = {"backbone": {"patch_embed": {"kernel": jnp.zeros((2, 3))},
                         "block_0": {"attn": {"query": {"kernel": jnp.zeros((3, 3))}},
                                     "ln1": {"scale": jnp.zeros(3)},
                                     "mlp": {"fc1": {"kernel": jnp.zeros((3, 2))}}},
                         "norm": {"scale": jnp.zeros(3)}},
            "projector": {"kernel": jnp.zeros((3, 4))}}
  groups = by_group.group_slices(params)
  assert set(groups) == {"patch_embed", "attention", "norms", "mlp", "heads"}
  covered = np.sort(np.concatenate(list(groups.values())))
  np.testing.assert_array_equal(covered, np.arange(6 + 9 + 3 + 6 + 3 + 12))
  rng = np.random.default_rng(0)
  truth = rng.normal(size=39)
  ref = truth + 0.3 * rng.normal(size=(8, 39))
  shift = np.zeros(39)
  shift[groups["attention"]] = 0.8             # the candidate is biased in the attention only
  cand = truth + shift + 0.3 * rng.normal(size=(12, 39))
  terms = by_group.group_terms(ref, cand, groups)
  w = np.full((1, 8), 1 / 8)
  v = np.full((1, 12), 1 / 12)
  whole = grad_error.gram_terms(ref @ ref.T, cand @ cand.T, cand @ ref.T, w, v, 1.0)
  assert terms["all"][0] == pytest.approx(whole["bias2_raw"][0], rel=1e-9)
  assert sum(t[1] for name, t in terms.items() if name != "all") == pytest.approx(1.0)
  assert terms["attention"][0] > 10 * abs(terms["mlp"][0])
  cand_same = truth + 0.3 * rng.normal(size=(12, 39))
  cand_same[:, groups["mlp"]] = ref.mean(0)[groups["mlp"]]   # exactly g* in that group
  assert by_group.group_terms(ref, cand_same, groups)["mlp"][2] == pytest.approx(1.0)
  ref[:, groups["heads"]] = 0.0                 # no gradient there yet: no share, no ratio
  silent = by_group.group_terms(ref, cand, groups)["heads"]
  assert silent[1] == 0.0 and np.isnan(silent[0]) and np.isnan(silent[2])
