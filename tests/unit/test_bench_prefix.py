"""The shared-prefix benchmark's measurement on a tiny real model (timings are not asserted, only what is measured)."""

from __future__ import annotations

import pytest
import torch
from test_scoring import EXAMPLES, make_tokenizer
from test_shared_prefix import SHARED
from tiny import tiny_model

from zotune.bench.prefix import CALLS, FORMS, format_table, main, measure


@pytest.mark.parametrize("examples", ["shared", "plain"])
def test_measure_runs_each_call_in_both_forms_and_counts_their_tokens(examples):
    tok = make_tokenizer("left")
    model = tiny_model("llama")
    exs = SHARED if examples == "shared" else EXAMPLES
    out = measure(model, tok, [exs, exs[::-1]], exs, reps=2, device=torch.device("cpu"))
    names = {f"{call}/{form}" for call in CALLS for form in FORMS} | {"packed_lozo/one_forward"}
    assert set(out["median_s"]) == set(out["tokens"]) == names
    assert all(len(v) == 2 for v in out["rounds_s"].values()) and set(out["speedup"]) == set(CALLS)
    # every row in one forward pads each to the longest: at least the tokens of the split forwards
    assert out["split_speedup"] > 0 and out["tokens"]["packed_lozo/one_forward"] >= out["tokens"]["packed_lozo/shared"]
    assert out["max_abs_diff"]["packed_losses"] < 1e-4 and out["max_abs_diff"]["dev_scores"] < 1e-4
    t = out["tokens"]
    if examples == "shared":  # the 20 shared tokens run once per copy (packed) or per batch, not per row
        assert out["shared_prefix_tokens"] == 20
        assert all(2 * t[f"{call}/shared"] < t[f"{call}/whole"] for call in CALLS)  # 20 of ~26 tokens a row
    else:  # nothing to share: both forms are the same forwards
        assert out["shared_prefix_tokens"] == 0
        assert all(t[f"{call}/shared"] == t[f"{call}/whole"] for call in CALLS)
    text = format_table(
        {
            "model": "tiny",
            "device": "cpu",
            "device_name": "cpu",
            "threads": 1,
            "torch": "x",
            "reps": 2,
            "results": {"4": out},
        }
    )
    assert "K = 4" in text and "packed_lozo" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--demos", "four"], "give comma-separated integers"),
        (["--demos", "-1"], ">= 0"),
        (["--reps", "0"], "--batches and --reps must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
