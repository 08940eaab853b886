"""The run's clock, the ETA and the cadence helper."""
import time

import pytest

from vit_accel import chronometer
from vit_accel.chronometer import Chronometer, itstime


def test_itstime_every_n_steps_and_at_the_end():
  assert [s for s in range(1, 11) if itstime(s, 4)] == [4, 8]
  assert [s for s in range(1, 11) if itstime(s, 4, total=10)] == [4, 8, 10]
  assert not any(itstime(s, 0) for s in range(1, 5))
  assert [s for s in range(1, 6) if itstime(s, 0, total=5)] == [5]


def test_clock_continues_from_a_checkpoint_and_excludes_evaluations(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(chronometer.time, "time", lambda: now[0])
  clock = Chronometer({"wall_s": 50.0, "eval_wall_s": 5.0})
  now[0] += 10.0
  clock.step_done()
  with clock.lap_paused():
    with clock.evaluating():
      now[0] += 3.0
    now[0] += 0.5                                # the eval's metrics line: not step time
  now[0] += 1.5
  clock.add_input_wait(1.5)                      # a data-bound wait: step time and input wait
  now[0] += 0.5
  clock.step_done()
  assert clock.lap() == (12.0, 2)                # the evaluation is not step time
  assert clock.lap_input_wait() == 1.5
  now[0] += 1.0                                  # writing the log line: not step time either
  clock.restart_lap()
  assert clock.lap_input_wait() == 0.0           # a new lap
  now[0] += 4.0
  clock.step_done()
  assert clock.lap() == (4.0, 1)
  assert clock.fields() == {"wall_s": 70.5, "train_wall_s": 62.5, "input_wait_s": 1.5}
  assert clock.meta() == {"wall_s": 70.5, "eval_wall_s": 8.0, "input_wait_s": 1.5}
  resumed = Chronometer(clock.meta())
  assert resumed.fields() == {"wall_s": 70.5, "train_wall_s": 62.5, "input_wait_s": 1.5}
  assert (clock.train_s, clock.eval_s) == (16.0, 3.0)


def test_a_new_run_starts_at_zero():
  clock = Chronometer()
  time.sleep(0.01)
  fields = clock.fields()
  assert 0.0 < fields["wall_s"] < 5.0 and fields["train_wall_s"] == pytest.approx(fields["wall_s"])


def test_format_duration():
  assert chronometer.format_duration(59) == "0m59s"
  assert chronometer.format_duration(3723) == "1h02m03s"
  assert chronometer.format_duration(-5) == "0m00s"
