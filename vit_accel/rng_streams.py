"""Every random stream of a run, in one table: what makes a run deterministic and resumable.

All randomness is a pure function of `config.seed` and a position (step, example, epoch, host), never
of a generator's hidden state, so a resumed run, every host of a multi-host run and a re-run of the
same command draw the same numbers. The constants below separate the streams; changing one changes
every result that depends on it (and the `:smoke` runs' logged values).

  stream                    key / seed                                         used by
  parameter init            jax.random.key(seed)                               run_setup.fresh_state
  token keep (per step)     fold_in(fold_in(key(seed), TOKEN_KEEP), step)      train_step.dropout_rng
  gradient error            fold_in(key(seed), GRAD_ERROR + step), then batch  modes/grad_error.py
  online decision           fold_in(key(seed), ONLINE + step), then batch      online.py
  online measurement data   training stream at MEASUREMENT_STREAM_OFFSET+step  online.py
  epoch permutation         (seed, epoch * EPOCH_HOST_STRIDE + host)           input_pipeline/pipeline.py
  view augmentation         fold_in((seed, global position), host)             input_pipeline/pipeline.py
  local crops               fold_in(view seed, LOCAL_CROP + j)                 input_pipeline/views.py
  TFDS file/buffer shuffle  seed * TFDS_SHUFFLE_STRIDE + start_step            input_pipeline/pipeline.py
  evaluation subsets        numpy default_rng(EVAL_BANK / EVAL_QUERIES)        evaluator.py
  fine-tune data            as epoch permutation / view augmentation, with     finetune.py
                            FINETUNE_DATA folded in (or added to the seed)
"""
from __future__ import annotations

TOKEN_KEEP = 1
GRAD_ERROR = 7919
ONLINE = 104729
# Measurement batches come from the training stream's positions far beyond any run's end: same
# distribution, never the batches training uses.
MEASUREMENT_STREAM_OFFSET = 10**9
EPOCH_HOST_STRIDE = 65536
LOCAL_CROP = 1000
TFDS_SHUFFLE_STRIDE = 1_000_003
EVAL_BANK = 1
EVAL_QUERIES = 2
# Separates --mode=finetune's data stream (epoch order, crops, flips) from pretraining's, which
# draws from the same (seed, position) pairs.
FINETUNE_DATA = 15485863
