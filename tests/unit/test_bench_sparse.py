"""The sparse-ZO benchmark (``python -m zotune.bench.sparse``) runs end to end on a tiny model: every figure is
produced, finite and consistent (the numbers themselves are measured, never asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from zotune.bench.sparse import _objective, bench_kernels, bench_mask, format_kernels
from zotune.bench.sparse import main as sparse_main
from zotune.models import load


def test_sparse_bench_writes_sane_json(workdir, tmp_path, capsys):
    out = tmp_path / "sparse.json"
    argv = ["--model", str(workdir / "model"), "--batch", "2", "--seq", "8", "--reps", "2", "--sparsity", "0.01"]
    assert sparse_main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "sparse MeZO step, embedding bfloat16" in table and "target ≤ 0.45" in table
    ratios = res["ratios"]
    assert {"peak_sparse_zo_over_fp32_inference", "step_over_2fwd", "sparse_forward_over_base_forward"} <= set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert all(res[k] > 0 for k in ("peak_fp32_inference_bytes", "peak_sparse_zo_bytes", "forward_s", "step_s"))
    assert len(res["rounds"]["step"]) == len(res["rounds"]["forward"]) == 2
    # the tiny Llama: 14 Linear weights (its tied head excluded), 1 % of each, at least one entry
    assert res["candidates"] == 4608 and res["k"] == 56 and res["sparsity"] == 0.01
    assert res["nf4_model_bytes"] < res["fp32_model_bytes"] and 0 < res["artifact_bytes"] < 10_000
    assert res["command"].startswith("python -m zotune.bench.sparse --model")
    # where it ran: the instruction set bitsandbytes picks its NF4 kernels by is in the JSON and the header
    assert res["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and res["threads"] >= 1
    assert f"cpu ({res['device_name']}, {res['cpu_capability']})" in table


def test_versus_full_splits_each_step_into_its_forwards_and_the_rest(workdir, tmp_path, capsys):
    out = tmp_path / "sparse.json"
    argv = ["--model", str(workdir / "model"), "--batch", "2", "--seq", "8", "--reps", "2", "--versus-full"]
    assert sparse_main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rounds = res["versus_full"]["rounds"]
    assert set(rounds) == {"full_step", "sparse_fp32_step", "sparse_nf4_step", "fp32_forward_pair", "nf4_forward_pair"}
    assert all(len(v) == 2 and min(v) > 0 for v in rounds.values())
    r = res["ratios"]
    # a step runs two forwards and more: never under its forwards' time (10 % slack for a noisy machine)
    assert r["full_step_over_2fp32_forward"] > 0.9
    # the median of two rounds lies between them (the rounds are kept to 0.1 ms), apart from the forwards timed alone
    per_round = sorted(a / b for a, b in zip(rounds["nf4_forward_pair"], rounds["fp32_forward_pair"], strict=True))
    same = r["nf4_forward_over_fp32_forward_same_rounds"]
    assert per_round[0] * 0.9 <= same <= per_round[1] * 1.1, (same, per_round)
    assert r["nf4_forward_over_fp32_forward"] == pytest.approx(res["forward_s"] / res["fp32_forward_s"])
    assert "same rounds: nf4 forward ÷ fp32 forward" in capsys.readouterr().out


def test_bench_masks_select_the_same_number_of_entries_per_tensor(workdir):
    model, _ = load(str(workdir / "model"))
    big = bench_mask(model, 0.01, "magnitude")
    rnd = bench_mask(model, 0.01, "random", seed=1)
    assert big.keys() == rnd.keys() and "lm_head.weight" not in big
    assert (
        all(len(big[n]) == len(rnd[n]) for n in big) and bench_mask(model, 0.01, "random", seed=1).keys() == rnd.keys()
    )
    w = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"].detach().abs().reshape(-1)
    chosen = big["model.layers.0.mlp.up_proj.weight"]
    assert w[chosen].min() >= w.sort(descending=True).values[len(chosen) - 1]  # the largest |w|


def test_kernel_bench_times_every_candidate():
    rows = bench_kernels(shapes=((16, 32),), densities=(0.05,), tokens=8, reps=1, inner=1)
    assert len(rows) == 1 and rows[0]["k"] == 26
    assert all(rows[0][f"{n}_s"] > 0 for n in ("bnb", "nf4_fold", "bnb+gather", "bnb+csr", "fp32", "fp32_fold"))
    assert "nf4_fold" in format_kernels(rows)


def test_real_workloads_score_every_candidate_of_a_real_training_batch(tmp_path):
    """SST-2 (MeZO's protocol) scores 2 candidates per example and TREC (k-shot) 6: a near-uniform random model's
    loss is ln 2 and ln 6, which another task's batch or candidate set would miss."""
    text = ["Question: What is it ? Answer type: Number Description Entity Human Location Abbreviation"] * 20
    save_tiny_model(tmp_path / "m", text + ["It was great terrible"] * 20)
    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "m"), AutoTokenizer.from_pretrained(tmp_path / "m")
    for workload, candidates in (("sst2", 2), ("trec", 6)):
        loss, shape = _objective(model, tok, workload, 4, 0, 0, "answer", torch.device("cpu"))
        assert float(loss()) == pytest.approx(math.log(candidates), abs=0.05), workload
        assert shape["tokens"] > 0 and shape["objective"].startswith("classification_loss")
    with pytest.raises(ValueError, match="never keeps a key/value cache"):
        loss(use_cache=True)
    with pytest.raises(ValueError, match="use one of synthetic, sst2, trec"):
        _objective(model, tok, "sst5", 4, 0, 0, "answer", torch.device("cpu"))
