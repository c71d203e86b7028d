"""The benchmark commands run end to end on a tiny model (their numbers are measured, never asserted: only that
every figure is produced, finite and consistent), and the accuracy table summarizes real runs."""

from __future__ import annotations

import json
import math

from test_train import config

from zotune.bench.accuracy import main as accuracy_main
from zotune.bench.peft_memory import bench_peft_memory
from zotune.bench.peft_memory import format_table as peft_table
from zotune.bench.report import speed_rows
from zotune.bench.speed import bench_speed_memory, format_table
from zotune.train import run_config_from_dict, train


def test_speed_bench_measures_every_method(workdir):
    res = bench_speed_memory(str(workdir / "model"), batch=2, seq=8, reps=1, adamw=True, methods=True, rank=1)
    expected = {"lozo_step_over_2fwd", "lozo_m_step_over_2fwd", "svrg_step_over_6fwd", "peak_lozo_over_inference"}
    assert expected <= res["ratios"].keys()
    assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
    assert len(res["rounds"]["forward"]) == 1 and "LOZO-M step" in format_table(res)
    methods, other = speed_rows(res)  # the results page's per-method table reads these keys
    assert {"mezo_gaussian", "lozo", "lozo_m", "svrg", "adamw", "reference"} <= methods.keys()
    assert methods["svrg"]["forwards"] == 6 and methods["lozo"]["step"] == res["ratios"]["lozo_step_over_2fwd"]
    assert all("peak" in m for m in methods.values()) and not other


def test_peft_memory_bench_measures_zofo_against_lora_and_full(workdir):
    res = bench_peft_memory(str(workdir / "model"), batch=2, seq=8, inner_steps=2, reps=1)
    keys = ("forward", "mezo_lora", "fo_lora", "zofo", "zofo_no_release", "fo_full")
    assert all(res[f"peak_{k}_bytes"] > 0 for k in keys)
    assert res["ratios"]["peak_fo_lora_over_fo_lora"] == 1.0 and res["forwards_per_call"]["zofo"] == 2 + 2 + 6
    assert "Bilevel ZOFO step" in peft_table(res) and "without the heap trim" in peft_table(res)


def test_accuracy_table_summarizes_runs_at_one_budget(workdir, tmp_path, capsys):
    base = {"train": {"max_forwards": 12, "steps": 100, "eval_every": 2, "test_at_start": True}}
    train(run_config_from_dict(config(workdir, tmp_path / "mezo", **base)))
    zofo = {"lr": 1e-2, "eps": 1e-2, "lr_lower": 1e-2, "lr_upper": 1e-2, "inner_steps": 1}
    train(run_config_from_dict(config(workdir, tmp_path / "zofo", method="zofo", model={"peft": "lora"}, zofo=zofo,
                                      **base)))  # fmt: skip
    assert accuracy_main([str(tmp_path / "mezo"), str(tmp_path / "zofo"), "--out", str(tmp_path / "t")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "t" / "runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["peft"]) for r in rows] == [("mezo", "none"), ("zofo", "lora")]
    assert all(r["forwards"] <= 12 and r["test"] is not None for r in rows)
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| zero-shot |" in table and "| MeZO (full) |" in table and "| Bilevel ZOFO |" in table
    assert "| step 0 |" in table
    for r in rows:  # the curves against forwards travel with the row (plots and forwards-to-accuracy need no run dir)
        dev, loss = r["curves"]["dev"], r["curves"]["loss"]
        assert dev[0][0] == 0 and dev[-1][0] == r["forwards"] and max(a for _, a in dev) == r["best_dev"]
        assert len(loss) == r["steps"] and all(f2 > f1 for (f1, _), (f2, _) in zip(loss, loss[1:], strict=False))
        assert r["peak_mem_mb"] > 0 and r["median_step_seconds"] > 0
    # each row keeps its full config as a recipe: training from it gives the row's numbers again
    from zotune.train.args import parse_train_args

    again = train(parse_train_args(["--config", str(tmp_path / "t" / "configs" / "mezo.yaml"),
                                    "--out", str(tmp_path / "again")]))  # fmt: skip
    redo = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again is not None and (redo["test"], redo["best_dev"]) == (rows[0]["test"], rows[0]["best_dev"])
    # the results page is made from the committed rows alone (the run folders are deleted first)
    import shutil

    from zotune.bench.report import forwards_to_reach, labels, report

    shutil.rmtree(tmp_path / "mezo")
    page = report([tmp_path / "t"], [], tmp_path / "docs" / "results.md", gain=0.0)
    mezo = rows[0]
    assert forwards_to_reach(mezo, mezo["zero_shot_dev"]) == 0  # step 0 already reaches zero-shot dev
    assert forwards_to_reach(mezo, 2.0) is None
    scan = [mezo, {**mezo, "run": "mezo-lr1", "hparams": {**mezo["hparams"], "lr": 1.0}}, rows[1]]
    assert labels(scan) == {"mezo": f"MeZO (full), lr {mezo['hparams']['lr']:g}", "mezo-lr1": "MeZO (full), lr 1",
                            "zofo": "Bilevel ZOFO"}  # fmt: skip
    assert "| MeZO (full) |" in page and "| Bilevel ZOFO |" in page and "](../t/runs.jsonl)" in page
    assert f"| zero-shot | {mezo['zero_shot_test']:.3f} |" in page and " · [config](../t/configs/zofo.yaml)" in page
    assert (tmp_path / "docs" / "img" / "curves-reviews.png").stat().st_size > 0
    # the regeneration check: the same rows pass; a test accuracy 20 % off fails at 10 %, passes at 25 %
    from zotune.bench.compare import main as compare_main

    assert compare_main([str(tmp_path / "t"), str(tmp_path / "t")]) == 0
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    rows[0]["test"] = rows[0]["test"] * 1.2 if rows[0]["test"] else 0.5
    (shifted / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    capsys.readouterr()
    assert compare_main([str(tmp_path / "t"), str(shifted)]) == 1
    out = capsys.readouterr().out
    assert "**NO**" in out and "not compared" in out  # the zofo row was not rerun: listed, not failed
    assert compare_main([str(tmp_path / "t"), str(shifted), "--tol", "0.25"]) == 0
    assert compare_main([str(tmp_path / "t"), str(shifted), "--tol", "0.25", "--strict"]) == 1


def test_compare_refuses_bad_input(tmp_path, capsys):
    import pytest

    from zotune.bench.compare import main as compare_main

    (tmp_path / "a.json").write_text(json.dumps({"ratios": {"x_step_over_2fwd": 1.0}}))
    (tmp_path / "none.json").write_text(json.dumps({"forward_s": 1.0}))
    for args, message in [
        ([str(tmp_path / "a.json"), str(tmp_path / "missing")], "neither a results folder"),
        ([str(tmp_path / "a.json"), str(tmp_path / "none.json")], "has no 'ratios'"),
        ([str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--tol", "1.5"], "tol must be in [0, 1)"),
        ([str(tmp_path / "a.json"), str(tmp_path)], "no runs.jsonl"),
    ]:
        with pytest.raises(SystemExit) as e:
            compare_main(args)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert compare_main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0


def test_report_refuses_a_folder_without_rows(tmp_path, capsys):
    import pytest

    from zotune.bench.report import main as report_main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path / "empty"), "--out", str(tmp_path / "page.md")])
    assert e.value.code == 2 and "no runs.jsonl in" in capsys.readouterr().err
    assert not (tmp_path / "page.md").exists()


def test_config_only_rebuilds_the_recipe_a_run_keeps(workdir, tmp_path, capsys):
    """Rows whose run folder is gone get their config back from the benchmark's command (``CONFIG_ONLY=1``): the
    rebuilt recipe equals the one the run itself keeps, and bad arguments write nothing."""
    import yaml

    from zotune.bench.accuracy import save_config
    from zotune.train.args import parse_train_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config(workdir, tmp_path / "unused")))
    argv = ["--config", str(recipe), "--train.max_forwards", "4", "--mezo.lr", "3e-3", "--out", str(tmp_path / "run")]
    train(parse_train_args([*argv, "--overwrite", "true"]))
    save_config(tmp_path / "run", tmp_path / "kept.yaml")
    assert accuracy_main(["--config-only", str(tmp_path / "rebuilt.yaml"), *argv]) == 0

    def body(path):  # the header line says where the recipe came from; the config below it must be the same
        return yaml.safe_load(path.read_text())

    assert body(tmp_path / "rebuilt.yaml") == body(tmp_path / "kept.yaml")
    assert body(tmp_path / "rebuilt.yaml")["mezo"]["lr"] == 3e-3
    capsys.readouterr()
    assert accuracy_main(["--config-only", str(tmp_path / "bad.yaml"), *argv, "--mezo.lrr", "1"]) == 2
    assert "mezo.lr" in capsys.readouterr().err and not (tmp_path / "bad.yaml").exists()
    assert accuracy_main(["--config-only", str(tmp_path / "bad.yaml")]) == 2


def test_speed_section_names_a_fixed_mmap_threshold(tmp_path):
    """A sparse benchmark run with ``--mmap-threshold`` is told apart from a default-allocator one on the page."""
    from zotune.bench.report import speed_section

    res = {"device": "cpu", "batch": 16, "seq": 64, "ratios": {"step_over_2fwd": 1.0,
           "peak_sparse_zo_over_fp32_inference": 0.66}}  # fmt: skip
    (tmp_path / "default.json").write_text(json.dumps(res))
    (tmp_path / "mmap.json").write_text(json.dumps({**res, "mmap_threshold": 131072}))
    rows = [r for r in speed_section([tmp_path / "default.json", tmp_path / "mmap.json"], tmp_path) if "SensZOQ" in r]
    assert len(rows) == 2 and "mmap" not in rows[0] and "glibc mmap threshold 131,072 B" in rows[1]
