"""rlox.plot: PNG curves from a synthetic metrics.jsonl, and clear errors for bad files."""

from __future__ import annotations

import json
import math
import struct

import pytest

from rlox.plot import plot_run, read_metrics  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_row(step: int, **extra) -> dict:
    return {
        "step": step,
        "epoch": step // 20,
        "split": "train",
        "time": 0.1 * step,
        "loss": 0.69 * math.exp(-step / 40),
        "reward_accuracy": min(1.0, 0.5 + step / 100),
        "reward_margin": step / 50,
        "chosen_reward": step / 100,
        "rejected_reward": -step / 100,
        "chosen_logps": -40 + step / 10,
        "rejected_logps": -40 - step / 10,
        "lr": 1e-4 * min(1.0, step / 10),
        "grad_norm": 1.0 / (1 + step),
        "skipped": 0.0,
    } | extra


def eval_row(step: int) -> dict:
    row = train_row(step)
    for key in ("lr", "grad_norm", "skipped"):
        del row[key]
    return row | {"split": "eval", "loss": row["loss"] + 0.05}


def write(path, rows, extra_lines=()) -> None:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def run(tmp_path):
    rows = [train_row(s) for s in range(1, 61)]
    rows += [eval_row(s) for s in (20, 40, 60)]
    write(tmp_path / "metrics.jsonl", rows)
    return tmp_path


def test_writes_every_figure(run):
    paths = plot_run(run)
    names = [p.name for p in paths]
    assert names == [
        "loss.png",
        "reward_accuracy.png",
        "reward_margin.png",
        "rewards.png",
        "logps.png",
        "lr.png",
        "grad_norm.png",
    ]
    for path in paths:
        assert path.parent == run / "plots"
        assert path.stat().st_size > 5000, path
        width, height = png_size(path)
        assert width >= 400 and height >= 200


def test_out_dir_and_file_argument(run, tmp_path):
    out = tmp_path / "figs" / "nested"
    paths = plot_run(run / "metrics.jsonl", out)
    assert paths and all(p.parent == out for p in paths)


def test_absent_metrics_are_skipped(tmp_path):
    rows = [{"step": s, "split": "eval", "loss": 1.0 / s, "reward_accuracy": None} for s in (1, 2)]
    write(tmp_path / "metrics.jsonl", rows)
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png"]


def test_loss_components_figure(tmp_path):
    rows = [train_row(s, loss_sigmoid=0.5, loss_sft=2.0 / s) for s in range(1, 6)]
    write(tmp_path / "metrics.jsonl", rows)
    names = [p.name for p in plot_run(tmp_path)]
    assert names[:2] == ["loss.png", "loss_components.png"]


def test_read_metrics_series(tmp_path):
    rows = [train_row(s) for s in (1, 2, 3)] + [train_row(2, loss=9.0)]  # a resumed run
    rows.append(train_row(4, loss=float("nan")))
    write(tmp_path / "metrics.jsonl", rows, ["", "   "])
    metrics = read_metrics(tmp_path)
    steps, values = metrics.series["train"]["loss"]
    assert steps == [1, 2, 3, 4]
    assert values[1] == 9.0 and math.isnan(values[3])
    assert metrics.get("eval", "loss") is None


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"^run_dir: .*metrics\.jsonl not found"):
        plot_run(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match="empty"):
        plot_run(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"step": 3, "split": "train", "loss": 0.5', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"step": 3, "split": "test", "loss": 0.5}', "'split' must be"),
        ('{"split": "train", "loss": 0.5}', "'step' is missing"),
        ('{"step": "3", "split": "train"}', "'step' must be a number"),
        ('{"step": 3, "split": "train", "loss": "low"}', "'loss' must be a number"),
    ],
)
def test_malformed_line_names_line_number(tmp_path, line, message):
    write(tmp_path / "metrics.jsonl", [train_row(1), train_row(2)], [line])
    with pytest.raises(ValueError, match=rf"metrics\.jsonl:3: {message}"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()
