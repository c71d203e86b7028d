"""``zotune plot``: reading metrics.jsonl, the plotted series, EMA smoothing, the PNG, errors and the CLI."""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from zotune.train.plot import (  # noqa: E402
    MetricsNotFoundError,
    _labels,
    _series,
    ema,
    main,
    plot_runs,
    read_metrics,
)

TRAIN = [
    {"kind": "train", "step": 1, "loss": 0.9, "lr": 1e-6, "forwards": 3},
    {"kind": "train", "step": 2, "loss": 0.7, "forwards": 5},
    {"kind": "train", "step": 3, "loss": 0.8, "forwards": 7},
    {"kind": "train", "step": 4, "loss": 0.5, "forwards": 9},
]
EVAL = [
    {"kind": "eval", "step": 2, "split": "dev", "accuracy": 0.6, "em": 0.1, "n": 50, "forwards": 6},
    {"kind": "eval", "step": 4, "split": "dev", "accuracy": 0.7, "n": 50, "forwards": 10},
    {"kind": "eval", "step": 4, "split": "test", "accuracy": 0.65, "n": 100, "forwards": 10},
]


def _run(path, rows, text=None):
    """A run directory with ``rows`` as metrics.jsonl (or raw ``text``)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert data[:4] == b"\x89PNG"
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > 200 and img.shape[1] > img.shape[0]  # two side-by-side panels: wider than tall


# ------------------------------------------------------------------------------------------------ reading


def test_read_metrics_order_blank_lines_and_unknown_kinds(tmp_path):
    text = json.dumps(TRAIN[0]) + "\n\n   \n" + json.dumps({"kind": "meta", "x": 1}) + "\n" + json.dumps(EVAL[0])
    run = _run(tmp_path / "r", None, text=text)
    recs = read_metrics(run)
    assert [r["kind"] for r in recs] == ["train", "meta", "eval"]
    s = _series(recs)  # the unknown kind is ignored
    assert s.train_x == [1.0] and s.dev_x == [2.0]


def test_read_metrics_invalid_json_names_file_and_line(tmp_path):
    text = json.dumps(TRAIN[0]) + "\n\n" + '{"kind": "train", "step": 2, "loss": \n'
    run = _run(tmp_path / "r", None, text=text)
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        read_metrics(run)
    _run(run, None, text="[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        read_metrics(run)


def test_read_metrics_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in .*empty \(is it a zotune run directory\?\)"):
        read_metrics(tmp_path / "empty")
    with pytest.raises(MetricsNotFoundError):
        read_metrics(tmp_path / "does-not-exist")


# ------------------------------------------------------------------------------------------------ series


def test_series_step_axis():
    s = _series(TRAIN + EVAL)
    assert s.train_x == [1, 2, 3, 4] and s.train_y == [0.9, 0.7, 0.8, 0.5]
    assert s.train_smooth is None
    assert s.metric == "accuracy"
    assert s.dev_x == [2, 4] and s.dev_y == [0.6, 0.7]
    assert s.test == (4, 0.65)
    zero_shot = {"kind": "eval", "step": 0, "split": "test", "accuracy": 0.5}
    assert _series([zero_shot, *TRAIN, *EVAL]).tests == [(0, 0.5), (4, 0.65)]  # every test point is drawn


def test_series_forwards_axis():
    s = _series(TRAIN + EVAL, x="forwards")
    assert s.train_x == [3, 5, 7, 9]
    assert s.dev_x == [6, 10] and s.test == (10, 0.65)
    # An eval line without forwards takes the latest train line's count at or before its step.
    ev = [{"kind": "eval", "step": 3, "split": "dev", "accuracy": 0.5}]
    assert _series(TRAIN + ev, x="forwards").dev_x == [7]


def test_series_seconds_axis_sums_steps_and_evaluations():
    rows = [
        {"kind": "eval", "step": 0, "split": "dev", "accuracy": 0.5, "seconds": 2.0},
        *[r | {"step_time": 1.5} for r in TRAIN[:2]],
        EVAL[0] | {"seconds": 3.0},
        *[r | {"step_time": 0.5} for r in TRAIN[2:]],
        EVAL[1] | {"seconds": 3.0},
        EVAL[2] | {"seconds": 7.0},
    ]
    s = _series(rows, x="seconds")
    assert s.train_x == [3.5, 5.0, 8.5, 9.0]  # 2 s of the first evaluation, then the steps, then 3 s more
    assert s.dev_x == [0.0, 5.0, 9.0] and s.dev_y == [0.5, 0.6, 0.7]
    assert s.test == (12.0, 0.65)
    with pytest.raises(ValueError, match=r"run-b: train line at step 1 has no 'step_time' field"):
        _series(TRAIN, x="seconds", where="run-b")


def test_series_forwards_missing_is_a_clear_error():
    rows = [{"kind": "train", "step": 1, "loss": 0.9}]
    with pytest.raises(ValueError, match=r"run-a: train line at step 1 has no 'forwards' field; plot with x='step'"):
        _series(rows, x="forwards", where="run-a")
    with pytest.raises(ValueError, match=r"eval line at step 5 has no 'forwards'"):
        _series([{"kind": "eval", "step": 5, "split": "dev", "f1": 0.3}], x="forwards")


def test_series_f1_metric_and_eval_only():
    rows = [
        {"kind": "eval", "step": 0, "split": "dev", "f1": 0.2, "em": 0.1},
        {"kind": "eval", "step": 10, "split": "dev", "f1": 0.4, "em": 0.3},
    ]
    s = _series(rows)
    assert s.metric == "f1" and s.dev_y == [0.2, 0.4]
    assert s.train_x == [] and s.test is None


def test_ema_against_hand_calculation():
    # s0 = y0; s_t = 0.5 * s_{t-1} + 0.5 * y_t
    assert ema([1.0, 3.0, 2.0], 0.5) == pytest.approx([1.0, 2.0, 2.0])
    # smooth 0.9: 0.9, then 0.9*0.9 + 0.1*0.7 = 0.88, then 0.9*0.88 + 0.1*0.8 = 0.872, then 0.9*0.872 + 0.1*0.5
    s = _series(TRAIN, smooth=0.9)
    assert s.train_y == [0.9, 0.7, 0.8, 0.5]  # raw curve kept for the faint line
    assert s.train_smooth == pytest.approx([0.9, 0.88, 0.872, 0.8348])
    # A NaN loss repeats the previous average instead of poisoning the rest.
    out = ema([math.nan, 1.0, math.nan, 3.0], 0.5)
    assert math.isnan(out[0]) and out[1:] == pytest.approx([1.0, 1.0, 2.0])


def test_labels_are_distinct(tmp_path):
    assert _labels([tmp_path / "a" / "run", tmp_path / "b"]) == ["run", "b"]
    assert _labels([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]
    assert _labels([tmp_path / "x", tmp_path / "x"]) == ["x", "x (2)"]


# ------------------------------------------------------------------------------------------------ plotting


def test_plot_single_run_default_out(tmp_path):
    run = _run(tmp_path / "run1", TRAIN + EVAL)
    out = plot_runs([run], smooth=0.6, title="one run")
    assert out == run / "plot.png"
    _assert_png(out)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "plot.png"]  # no temp file left behind


def test_plot_several_runs_need_out(tmp_path):
    a = _run(tmp_path / "a" / "run", TRAIN + EVAL)
    b = _run(
        tmp_path / "b" / "run", [{"kind": "eval", "step": 3, "split": "dev", "f1": 0.5, "forwards": 7}]
    )  # eval only
    with pytest.raises(ValueError, match=r"several runs need an output file"):
        plot_runs([a, b])
    out = plot_runs([a, b], tmp_path / "new" / "dir" / "both.png", x="forwards")
    assert out == tmp_path / "new" / "dir" / "both.png"
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["both.png"]


def test_plot_without_evaluations_and_empty_file(tmp_path):
    run = _run(tmp_path / "r", TRAIN)
    _assert_png(plot_runs([run]))
    empty = _run(tmp_path / "empty", None, text="\n")
    _assert_png(plot_runs([empty]))


def test_plot_overwrites_existing_png(tmp_path):
    run = _run(tmp_path / "r", TRAIN)
    (run / "plot.png").write_bytes(b"old")
    _assert_png(plot_runs([run]))


def test_plot_bad_inputs(tmp_path):
    run = _run(tmp_path / "r", TRAIN)
    with pytest.raises(ValueError, match=r"no run directories"):
        plot_runs([])
    with pytest.raises(ValueError, match=r"x must be one of step, forwards, seconds, got 'time'"):
        plot_runs([run], x="time")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"smooth must be in \[0, 1\)"):
            plot_runs([run], smooth=bad)
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in .*nowhere"):
        plot_runs([run, tmp_path / "nowhere"], tmp_path / "o.png")
    with pytest.raises(ValueError, match=r"is a directory"):
        plot_runs([run], tmp_path)
    assert not (run / "plot.png").exists()


# ------------------------------------------------------------------------------------------------ CLI


def test_main_success(tmp_path, capsys):
    a = _run(tmp_path / "a", TRAIN + EVAL)
    b = _run(tmp_path / "b", TRAIN)
    out = tmp_path / "cmp.png"
    argv = [str(a), str(b), "--out", str(out), "--x", "forwards", "--smooth", "0.9", "--title", "A vs B"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    _assert_png(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--x", "time"], r"x must be one of step, forwards"),
        (["--smooth", "1"], r"smooth must be in \[0, 1\)"),
        (["{tmp}/MISSING", "--out", "{tmp}/o.png"], r"no metrics\.jsonl in .*MISSING"),
        (["{tmp}/r"], r"several runs need an output file \(--out PNG\)"),
    ],
    ids=["x", "smooth", "missing-run", "no-out"],
)
def test_main_errors(tmp_path, capsys, extra, message):
    run = _run(tmp_path / "r", TRAIN)
    assert main([str(run), *(e.format(tmp=tmp_path) for e in extra)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert re.fullmatch(rf"zotune plot: error: .*{message}.*\n", cap.err)
    assert not (run / "plot.png").exists()


def test_main_usage_errors_return_2(capsys):
    assert main([]) == 2  # no RUN: argparse prints usage and the error
    assert "zotune plot: error:" in capsys.readouterr().err
    assert main(["r", "--smooth", "abc"]) == 2
    assert main(["--help"]) == 0
