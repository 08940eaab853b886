"""The precision policy, read off the program the train step hands to XLA (model.dtype=bfloat16).

Policy: parameters and optimiser state float32; the backbone's and heads' matmuls, attention and
activations in model.dtype; LayerNorm and BatchNorm statistics, attention softmax, the losses and
the contrastive logits in float32. The check reads the lowered StableHLO with its debug locations
(each op carries the flax module path that produced it), because XLA:CPU has no bfloat16 matmul and
rewrites every one to float32 while compiling; the compiled program is checked for the train state
it takes and returns.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import tiny_config

LOC = re.compile(r'^#(loc\d+) = loc\("([^"]*)"')
OP = re.compile(r"= stablehlo\.(dot_general|exponential|log|reduce|subtract)\b(.*) "
                r"loc\(#(loc\d+)\)\s*$")
ARG = re.compile(r'%arg\d+: tensor<([^>]*)> loc\("(state\.[^"]*)"\)')
ALGORITHM = re.compile(r"lhs_precision_type = (\w+), rhs_precision_type = (\w+)")
TYPES = re.compile(r"tensor<(?:[0-9x]*x)?([a-z]+[0-9]*)>")
BACKBONE = ("/backbone/",)
HEADS = ("/projector/", "/predictor/", "/head/")


def lowered_ops(objective: str, schedule: str, attention: str = "auto"):
  """[(op, operand/result dtypes, module path)] of the bf16 train step for `schedule`'s first
  stage, its (dtype, name) arguments, and the train states the compiled step takes and returns."""
  from vit_accel import run_setup, step_plan, train_step
  config = tiny_config(recipe=objective, schedule=schedule)
  config.model.dtype = "bfloat16"
  config.model.attention = attention
  setup = run_setup.build(config, splits=())
  strategies = step_plan.parse_schedule(schedule, config.compression.bucket,
                                        config.model)[0].strategies
  step = jax.jit(train_step.make_train_step(config, setup.model, setup.tx, strategies))
  batch = {name: tuple(jax.ShapeDtypeStruct(shape, jnp.uint8) for shape in shapes)
           for name, shapes in train_step.batch_shapes(config).items()}
  state = jax.eval_shape(setup.fresh_state)
  lowered = step.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32))
  text = lowered.as_text(debug_info=True)
  names = {m.group(1): m.group(2) for m in map(LOC.match, text.splitlines()) if m}
  ops = []
  for line in text.splitlines():
    m = OP.search(line)
    if m:
      attributes, signature = m.group(2).rsplit(" : ", 1)
      types = TYPES.findall(signature)
      algorithm = ALGORITHM.search(attributes)
      if algorithm:   # the dot's declared arithmetic (e.g. bf16 x bf16 -> f32), not its containers
        types = [algorithm.group(1), algorithm.group(2), *types[2:]]
      ops.append((m.group(1), types, names.get(m.group(3), "")))
  compiled = lowered.compile()
  in_state = compiled.in_avals[0][0]
  out_state = compiled.out_info[0]
  return ops, ARG.findall(text), in_state, out_state


# Attention: 'heads_major' is what 'auto' runs on a CPU; 'xla' what it runs on a TPU or a float32
# GPU. One objective each for the second, so every implementation that can lower here is checked.
@pytest.mark.parametrize("objective,schedule,attention",
                         [("mocov3", "none", "heads_major"),
                          ("simclr", "1:patch8|patch8", "heads_major"),
                          ("dino", "1:keep0.5|full|full", "heads_major"),
                          ("mocov3", "none", "xla")])
def test_bfloat16_step_follows_the_precision_policy(objective, schedule, attention):
  ops, args, state, out_state = lowered_ops(objective, schedule, attention)
  in_model = lambda name: any(p in name for p in BACKBONE + HEADS)  # noqa: E731
  under = lambda name, parts: any(f"/{p}/" in name for p in parts)  # noqa: E731

  # Matmuls of the backbone and heads: bfloat16 operands (the attention logits accumulate in
  # float32), except the PI-resize of the float32 patch kernel and position grid (weight transforms).
  model_dots = [(t, n) for op, t, n in ops if op == "dot_general" and in_model(n)
                and "/prototypes/" not in n]
  assert len(model_dots) > 20
  # DINO's prototype scores are logits: float32.
  prototypes = [t for op, t, n in ops if op == "dot_general" and "/prototypes/" in n]
  assert (len(prototypes) > 0) == (objective == "dino")
  assert all(t[:2] == ["f32", "f32"] for t in prototypes), prototypes
  for types, name in model_dots:
    if "/pi_resize/" in name or "/pos_resize/" in name:
      continue
    assert types[:2] == ["bf16", "bf16"], (types, name)
  heads_dots = [t for t, n in model_dots if any(h in n for h in HEADS)]
  assert heads_dots and all(t[:2] == ["bf16", "bf16"] for t in heads_dots)
  # Attention softmax in float32; the only bfloat16 exponentials are the networks' activations
  # (exact GELU's).
  exps = [(t, n) for op, t, n in ops if op == "exponential"]
  attention_exps = [t for t, n in exps if "/attn/" in n]
  assert attention_exps and all(t == ["f32"] for t in attention_exps)
  for types, name in exps:
    assert types == ["f32"] or (in_model(name) and "/attn/" not in name), (types, name)
  # Losses and the contrastive logits: every matmul, exp and log outside the networks in float32.
  loss_ops = [(op, t, n) for op, t, n in ops if op not in ("reduce", "subtract")
              and not in_model(n)]
  assert any(op == "exponential" for op, _, _ in loss_ops)
  for op, types, name in loss_ops:
    assert set(types) <= {"f32", "i32", "ui32", "i1"}, (op, types, name)
  # Normalisation statistics in float32.
  norms = ("ln1", "ln2", "norm", "bn0", "bn1", "bn2")
  stats = [t for op, t, n in ops if op == "reduce" and under(n, norms)]
  assert stats and all(t[0] == "f32" for t in stats), stats
  # ... and the centring (x - mean) too: a bfloat16 reduce can hide behind a float32 accumulator.
  centred = [t for op, t, n in ops if op == "subtract" and under(n, norms)]
  assert centred and all(t[0] == "f32" for t in centred), centred
  # Parameters and optimiser state: float32 going in and coming out.
  floating = [(t.split("x")[-1], n) for t, n in args if n.startswith(("state.params",
                                                                       "state.ema_params",
                                                                       "state.opt_state"))]
  assert floating and all(dt in ("f32", "i32") for dt, _ in floating), floating
  for tree in (state, out_state):
    for leaf in jax.tree.leaves((tree.params, tree.ema_params, tree.opt_state)):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
