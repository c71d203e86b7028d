"""The packed benchmark's measurement on a tiny real model (timings are not asserted, only what is measured)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_batch, tiny_model

from zotune.bench.packed import LMRows, Workload, _measure, format_table, main
from zotune.core.packed_estimators import FZOO, PackedTwoPoint, PerExample


def test_measure_times_every_step_against_the_forward_of_its_own_rows():
    model = tiny_model("llama")
    batch = tiny_batch(0, batch=4, seq=8)
    rows = LMRows(model, batch)
    wl = Workload("tiny", [list(range(4))], lambda idx: rows(idx, 1).mean(), rows, 8.0)
    estimators = {
        "packed_lozo": lambda b: PackedTwoPoint(1),
        "packed_nspsa3": lambda b: PackedTwoPoint(3),
        "packed_per_example": lambda b: PerExample(b),
        "packed_fzoo3": lambda b: FZOO(3),
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = _measure(
        model, wl, "float32", estimators, torch.device("cpu"), reps=2, rank=1, max_rows=None, sequential=True
    )
    assert out["copies"] == {"packed_lozo": 2, "packed_nspsa3": 6, "packed_per_example": 2, "packed_fzoo3": 4}
    assert {"forward_b", "forward_x2", "forward_x4", "forward_x6", "mezo_gaussian", "mezo_rademacher", "lozo"} <= set(
        out["median_s"]
    )
    assert all(len(v) == 2 for v in out["rounds_s"].values())
    for key, value in out["ratios"].items():  # the update's share is a difference of two times: any sign
        assert math.isfinite(value) and (value > 0 or key == "packed_lozo_update_over_forward_same_rows"), key
    per_probe = 1e3 * out["median_s"]["packed_per_example"] / 4  # one probe per example: 4 probes
    assert out["ratios"]["packed_per_example_ms_per_probe"] == pytest.approx(per_probe)
    # ops: a packed step dispatches more than the forward of its rows (hooks, draws, update), n-SPSA's 3 probes more
    # than LOZO's one; the forwards of more copies are the same ops on more rows
    ops = out["ops_syncs"]
    assert ops["forward_x2"] == ops["forward_x6"]
    # the packed LOZO step split into its forward (hooks, draws) and the rest: the forward alone writes nothing
    assert ops["forward_x2"][0] < ops["packed_lozo_evaluate"][0] < ops["packed_lozo"][0]
    assert "packed_lozo_update_over_forward_same_rows" in out["ratios"]
    # the deferred update: the step writes no matrix; the write (one addmm_ per matrix) is timed apart and charged
    # once per refresh period of V
    matrices = sum(p.ndim == 2 for p in model.parameters())
    assert ops["packed_lozo_fold"][0] >= matrices and out["refresh_every"] == 50
    assert {"packed_lozo_amortized_over_forward_same_rows", "packed_lozo_amortized_over_mezo_gaussian"} <= set(
        out["ratios"]
    )
    assert 1 < out["ratios"]["packed_lozo_ops_over_forward_same_rows"] < ops["packed_nspsa3"][0] / ops["forward_x2"][0]
    assert "ops (syncs)" in format_table({"model": "tiny", "device": "cpu", "device_name": "cpu", "threads": 1,
                                         "torch": "x", "rank": 1, "reps": 2, "padding": "left", "outputs": "float32",
                                         "results": {"tiny/float32": out}})  # fmt: skip
    # every step ran on the same model (tiny lr): it moved, and no hook was left on it
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # a row cap: the reference forwards run in the same chunks as the steps
    capped = _measure(
        model, wl, "float32", estimators, torch.device("cpu"), reps=1, rank=1, max_rows=4, sequential=False
    )
    assert "mezo_gaussian" not in capped["median_s"] and capped["copies"]["packed_nspsa3"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workloads", "sst3"], "--workloads: choose from"),
        (["--precisions", "float16"], "--precisions: choose from"),
        (["--probes", "1"], "--probes >= 2"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
