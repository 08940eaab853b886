"""metrics.jsonl: every line carries a kind, readers select by it, legacy lines get theirs."""
import json

import pytest

from vit_accel.metric_writer import KINDS, MetricWriter, read_metrics


def test_lines_carry_their_kind_and_readers_select_by_it(tmp_path):
  writer = MetricWriter(str(tmp_path), primary=True, tensorboard=False)
  writer.write(2, {"loss": 1.5}, kind="train")
  writer.write(2, {"knn_top1": 0.5}, kind="eval")
  writer.write(4, {"online_choice": "full"}, kind="online")
  with pytest.raises(ValueError, match="metrics kind 'evaluation'"):
    writer.write(4, {"knn_top1": 0.6}, kind="evaluation")
  writer.close()
  assert [m["kind"] for m in read_metrics(str(tmp_path))] == ["train", "eval", "online"]
  assert read_metrics(str(tmp_path), kind="eval") == [{"step": 2, "kind": "eval", "knn_top1": 0.5}]
  assert set(KINDS) == {"train", "eval", "online", "finetune"}


def test_lines_written_before_kinds_existed_get_one_from_their_fields(tmp_path):
  legacy = [{"step": 2, "loss": 1.0}, {"step": 2, "knn_top1": 0.4}, {"step": 4, "online_choice": "x"}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in legacy))
  assert [m["kind"] for m in read_metrics(str(tmp_path))] == ["train", "eval", "online"]


def test_only_the_primary_process_writes(tmp_path):
  writer = MetricWriter(str(tmp_path), primary=False, tensorboard=False)
  writer.write(2, {"loss": 1.0}, kind="train")
  writer.close()
  assert read_metrics(str(tmp_path)) == []


def test_resume_drops_lines_past_the_checkpoint_atomically(tmp_path):
  writer = MetricWriter(str(tmp_path), primary=True, tensorboard=False)
  for step in (2, 4, 6):
    writer.write(step, {"loss": float(step)}, kind="train")
  writer.drop_after(4)
  writer.write(6, {"loss": 0.0}, kind="train")
  writer.close()
  assert [(m["step"], m["loss"]) for m in read_metrics(str(tmp_path))] == [(2, 2.0), (4, 4.0),
                                                                            (6, 0.0)]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
