"""The claims grid driver (zotune.bench.claims) on a tiny model: cell statuses, a 2-lane run with a resume and no
jsonargparse, lr picks, the pack/unpack round trip, the deadline, and the claims table's verdicts and refusals on
hand-made rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from zotune.bench import claims as cl
from zotune.bench.claims import Cell, Comparison, Protocol, Results, Row, burst, driver, reach, verdicts
from zotune.bench.claims.protocol import recipe_path

SRC = str(Path(cl.__file__).resolve().parents[3])


def tiny_protocol(workdir: Path, **kw) -> Protocol:
    """The grid's shape at toy size: MeZO scanned over two lrs, two seeds, FO full as the reference."""
    rows = (
        Row("mezo", "mezo", {"lr": 1e-2, "eps": 1e-2}, label="MeZO"),
        Row("fo-full", "adamw", {"lr": 1e-3}, fwd_per_step=1.0, kind="ref", label="FO full"),
    )
    base = dict(
        model=str(workdir / "model"),
        tasks={"reviews": {"task": str(workdir / "reviews.yaml"), "protocol": "files"}},
        rows=rows,
        comparisons=(Comparison("x", 1, "MeZO > FO full", "mezo", "fo-full"),),
        seeds=(0, 1),
        scan_factors=(0.5, 1.0),
        budget=8,
        scan_budget=6,
        ref_budget=4,
        eval_forwards=4,
        ref_eval_forwards=2,
        batch_size=4,
    )
    return Protocol(**{**base, **kw})


def without_watchdog(protocol: Protocol, tmp_path: Path) -> Protocol:
    """``protocol`` with its recipe's watchdog off. On a fast machine a tiny-model cell at the scan's lr saturates
    within seconds (dev 0.9, the ± losses equal), and the watchdog would end it before the deadline under test."""
    tree = yaml.safe_load(recipe_path(protocol).read_text())
    tree.setdefault("train", {})["watchdog"] = False
    recipe = tmp_path / "recipe-no-watchdog.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return replace(protocol, recipe=str(recipe))


def cell_named(protocol: Protocol, name: str) -> Cell:
    return next(c for c in cl.grid(protocol) if c.name == name)


def write_cell(protocol: Protocol, out: Path, name: str, lr: float | None = None, **train) -> Path:
    """The cell's config as the driver writes it (optionally with train overrides), for an in-process run."""
    tree = cl.resolved(cl.cell_tree(cell_named(protocol, name), protocol, out=out, device="cpu", lr=lr))
    tree["train"].update(train)
    path = out / "cells" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def block_jsonargparse(folder: Path) -> str:
    """A sitecustomize that makes `import jsonargparse` fail, as on a machine without it; its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'jsonargparse':\n"
        "            raise ImportError('jsonargparse is not installed on this machine')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    return str(folder)


def test_cell_configs_follow_the_protocol_and_the_real_grid_is_the_written_one(workdir):
    grid = cl.grid(cl.PROTOCOL, "cpu")
    names = [c.name for c in grid]
    assert len(names) == len(set(names))
    # 11 scanned rows on the CPU profile (7 of the papers' with SensZOQ over NF4, 4 packed) x 5 lrs on SST-2, and
    # FZOO's grid extended by six lrs above its top edge and the paper-settings SVRG's by two; on TREC the 6 rows
    # of the papers' claims (the packed rows and the paper-settings SVRG run on SST-2 only) x 3 lrs, and ZOFO's by
    # one (x 2, in SST-2's grid already); 3 seeds each; FO refs x 3 seeds x 2 tasks
    assert sum(c.phase == "scan" for c in grid) == 11 * 5 + 6 + 2 + 6 * 3 + 1 == 82
    svrg = sorted(c.scan_lr for c in grid if c.phase == "scan" and c.row.name == "mezo-svrg-paper")
    assert svrg == pytest.approx([2.5e-6, 5e-6, 1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4])
    zofo = {t: sorted(c.scan_lr for c in grid if c.phase == "scan" and c.task == t and c.row.name == "zofo")
            for t in ("sst2", "trec")}  # fmt: skip
    assert zofo == {"sst2": pytest.approx([1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4]),
                    "trec": pytest.approx([1.25e-5, 2.5e-5, 5e-5, 1e-4])}  # fmt: skip
    assert sum(c.phase == "seeds" for c in grid) == (11 + 6) * 3
    sst2_only = {"packed-lozo", "nspsa4", "per-example", "fzoo", "mezo-svrg-paper"}
    on_cpu = {r.name for r in cl.ROWS if "cpu" in r.profiles}
    assert {c.row.name for c in grid if c.task == "trec"} == on_cpu - sst2_only
    fzoo = sorted(c.scan_lr for c in grid if c.phase == "scan" and c.task == "sst2" and c.row.name == "fzoo")
    assert fzoo == pytest.approx([2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3, 1.28e-2, 2.56e-2])
    assert {c.row.name for c in grid if c.path == "packed" and c.task == "sst2"} == {
        "packed-lozo", "nspsa4", "per-example", "fzoo"}  # fmt: skip
    # on TREC: LOZO and LOZO-M through their packed twins, the scans at x {1/4, 1/2, 1} of the row's lr
    assert {c.row.name for c in grid if c.path == "packed" and c.task == "trec"} == {"lozo", "lozo-m"}
    assert {c.scan_lr for c in grid if c.phase == "scan" and c.name.startswith("trec-mezo-")} == {
        1.25e-5, 2.5e-5, 5e-5}  # fmt: skip
    for name, method, lr in (("trec-lozo-m-scan-lr2.5e-05", "packed_lozo_m", None), ("trec-lozo-s1", "packed_lozo",
                             1e-5), ("sst2-lozo-m-s0", "lozo_m", 1e-5), ("trec-mezo-s0", "mezo", 1e-5)):  # fmt: skip
        tree = cl.resolved(cl.cell_tree(cell_named(cl.PROTOCOL, name), cl.PROTOCOL, out=Path("o"), device="cpu",
                                        lr=lr))  # fmt: skip
        lozo = {"eps": 1e-3, "rank": 2, "refresh_every": 50} if "lozo" in name else {"eps": 1e-3}
        want = {"lr": lr or 2.5e-5, **lozo, **({"beta": 0.9} if "lozo-m" in name else {})}
        assert tree["method"] == method and {k: tree[method][k] for k in want} == want, name
        assert tree[method]["num_directions"] == 1 and tree["train"]["eval_every"] == 100
    assert sum(c.phase == "refs" for c in grid) == 12
    assert "sst2-senszoq-s0" in names and "sst2-senszoq-fp32base-s0" not in names
    assert "trec-senszoq-fp32base-s2" in [c.name for c in cl.grid(cl.PROTOCOL, "gpu")]
    svrg = cell_named(cl.PROTOCOL, "sst2-mezo-svrg-scan-lr1.25e-05")
    tree = cl.resolved(cl.cell_tree(svrg, cl.PROTOCOL, out=Path("/tmp/x"), device="cpu"))
    # both SVRG lrs scaled by 1/4; dev every 200 forwards (40 steps of 5); the scan's budget; seed 0; data seed 0
    assert (tree["mezo_svrg"]["lr"], tree["mezo_svrg"]["anchor_lr"]) == (1.25e-5, 2.5e-5)
    assert (tree["train"]["eval_every"], tree["train"]["max_forwards"], tree["seed"]) == (40, 500, 0)
    assert tree["data"] == {**tree["data"], **cl.TASKS["sst2"]} and tree["out"] == "/tmp/x/" + svrg.name
    paper = cl.resolved(cl.cell_tree(cell_named(cl.PROTOCOL, "sst2-mezo-svrg-paper-scan-lr4e-05"), cl.PROTOCOL,
                                     out=Path("/tmp/x"), device="cpu"))  # fmt: skip
    # the paper's settings: q 2, annealing by 4, anchor lr 10 x the minibatch lr (both x 4 at this grid point);
    # dev every 33 steps of 6 forwards
    assert {k: paper["mezo_svrg"][k] for k in ("lr", "anchor_lr", "q", "anneal")} == {
        "lr": 4e-5, "anchor_lr": 4e-4, "q": 2, "anneal": 4.0}  # fmt: skip
    assert paper["train"]["eval_every"] == 33
    # the loss checked once per epoch, as in the paper: the minibatch steps (1 in q) of one pass over the train set
    epoch_steps = cl.TASKS["sst2"]["n_train"] / paper["train"]["batch_size"]
    assert paper["mezo_svrg"]["anneal_every"] == round(epoch_steps * (1 - 1 / paper["mezo_svrg"]["q"]))
    zofo = cl.resolved(cl.cell_tree(cell_named(cl.PROTOCOL, "trec-zofo-s1"), cl.PROTOCOL, out=Path("o"),
                                    device="cuda", lr=1e-4))  # fmt: skip
    assert (zofo["zofo"]["lr"], zofo["zofo"]["lr_lower"], zofo["zofo"]["lr_upper"]) == (1e-4, 2e-3, 2e-3)
    got = (zofo["model"]["peft"], zofo["train"]["max_forwards"], zofo["seed"], zofo["data"]["k"])
    assert got == ("lora", 2000, 1, 16)
    ref = cl.resolved(
        cl.cell_tree(cell_named(cl.PROTOCOL, "sst2-fo-lora-s2"), cl.PROTOCOL, out=Path("o"), device="cpu")
    )
    assert (ref["adamw"]["lr"], ref["train"]["max_forwards"], ref["train"]["eval_every"]) == (5e-4, 200, 40)
    sens = cl.resolved(cl.cell_tree(cell_named(cl.PROTOCOL, "sst2-senszoq-s0"), cl.PROTOCOL, out=Path("o"),
                                    device="cpu", lr=1e-4))  # fmt: skip
    assert {k: sens["model"][k] for k in ("peft", "sparsity", "mask", "quantize")} == {**cl.SPARSE, "quantize": "nf4"}
    # a packed row (2 blocks of rows per counted forward) gets half the counted forwards and dev every 50 steps
    packed = Row("lozo-packed", "lozo", {"lr": 1e-4, "eps": 1e-3}, rows=2, path="packed")
    p = Protocol(rows=(*cl.ROWS, packed))
    t = cl.resolved(cl.cell_tree(cell_named(p, "sst2-lozo-packed-s0"), p, out=Path("o"), device="cpu", lr=1e-4))
    assert (t["train"]["max_forwards"], t["train"]["eval_every"]) == (1000, 50)
    # the protocol check names the key: a seed, a budget; the model may be named by its GGUF file
    expected = cl.expected_config(svrg, cl.PROTOCOL, None)
    assert cl.protocol_diff(expected, expected, cl.PROTOCOL) == []
    bad = yaml.safe_load(yaml.safe_dump(expected))
    bad["seed"], bad["train"]["max_forwards"] = 3, 1000
    assert cl.protocol_diff(bad, expected, cl.PROTOCOL) == ["train.max_forwards 1000 (protocol: 500)",
                                                            "seed 3 (protocol: 0)"]  # fmt: skip
    bad = yaml.safe_load(yaml.safe_dump(expected))
    bad["model"]["name"] = "/carried/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cl.protocol_diff(bad, expected, cl.PROTOCOL) == []
    bad["model"]["name"] = "other-model"
    assert cl.protocol_diff(bad, expected, cl.PROTOCOL) == ["model.name 'other-model' (protocol: 'smollm2-135m')"]


def test_plan_statuses_and_lr_pick(workdir, tmp_path):
    p = tiny_protocol(workdir)
    out, res = tmp_path / "runs", tmp_path / "results"

    def state() -> dict[str, str]:
        return {st.cell.name: st.state for st in cl.statuses(p, out, Results.load(res))[0]}

    fresh = state()
    assert fresh == {"reviews-mezo-scan-lr0.005": "missing", "reviews-mezo-scan-lr0.01": "missing",
                     "reviews-fo-full-s0": "missing", "reviews-fo-full-s1": "missing",
                     "reviews-mezo-s0": "waiting", "reviews-mezo-s1": "waiting"}  # fmt: skip
    # one scan cell finished in-process (the subprocess's own entry point), the other stopped after step 2
    assert cl.run_cell(write_cell(p, out, "reviews-mezo-scan-lr0.01")) == 0
    assert cl.run_cell(write_cell(p, out, "reviews-mezo-scan-lr0.005", steps=2)) == 0
    (out / "reviews-mezo-scan-lr0.005" / "results.json").unlink()  # as if killed right after its step-2 checkpoint
    sts = {st.cell.name: st for st in cl.statuses(p, out, Results.load(res))[0]}
    assert sts["reviews-mezo-scan-lr0.01"].detail.startswith("finished, not summarized")
    assert sts["reviews-mezo-scan-lr0.005"].state == "unfinished"
    assert sts["reviews-mezo-scan-lr0.005"].detail == "resumes from step 2 (5 of 6 forwards)"
    assert sts["reviews-mezo-s0"].detail == "lr scan 0 of 2 done"
    # summarizing takes the finished cell only: the unfinished one is never a row, the scan is not complete
    added = cl.summarize_finished(p, out, Results.load(res), log=lambda m: None)
    assert added == ["reviews-mezo-scan-lr0.01"] and cl.picks(p, Results.load(res)) == {}
    assert state()["reviews-mezo-s0"] == "waiting" and not (res / "lr").exists()
    # the unfinished cell resumes (run_cell picks --resume) and the scan completes: the lr is picked and recorded
    assert cl.run_cell(write_cell(p, out, "reviews-mezo-scan-lr0.005")) == 0
    cl.summarize_finished(p, out, Results.load(res), log=lambda m: None)
    pick = json.loads((res / "lr" / "reviews-mezo.json").read_text())
    rows = Results.load(res).rows
    devs = {0.005: rows["reviews-mezo-scan-lr0.005"]["best_dev"], 0.01: rows["reviews-mezo-scan-lr0.01"]["best_dev"]}
    best = max(devs.values())
    assert pick["lr"] == min(lr for lr, d in devs.items() if d == best)  # the best dev; ties to the smaller lr
    assert [g["lr"] for g in pick["grid"]] == [0.005, 0.01] and pick["edge"] is True
    assert state()["reviews-mezo-s0"] == "missing"
    # conflicts: a folder that is not a run folder, a run whose seed is not the protocol's; neither is touched
    (out / "reviews-fo-full-s0").mkdir()
    (out / "reviews-fo-full-s0" / "notes.txt").write_text("mine")
    write_cell(p, out, "reviews-fo-full-s1")
    cfg = out / "cells" / "reviews-fo-full-s1.yaml"
    tree = yaml.safe_load(cfg.read_text())
    tree["seed"] = 7
    cfg.write_text(yaml.safe_dump(tree))
    assert cl.run_cell(cfg) == 0
    sts = {st.cell.name: st for st in cl.statuses(p, out, Results.load(res))[0]}
    assert sts["reviews-fo-full-s0"].state == "conflict" and "not a run folder" in sts["reviews-fo-full-s0"].detail
    assert sts["reviews-fo-full-s1"].state == "conflict" and "seed 7 (protocol: 1)" in sts["reviews-fo-full-s1"].detail
    assert cl.run_cell(write_cell(p, out, "reviews-fo-full-s0")) == 2  # refused: the folder is left as it was
    assert (out / "reviews-fo-full-s0" / "notes.txt").read_text() == "mine"
    said: list[str] = []
    assert cl.summarize_finished(p, out, Results.load(res), log=said.append) == []
    assert any("reviews-fo-full-s1" in m and "seed 7" in m for m in said)
    plan = cl.format_plan(*cl.statuses(p, out, Results.load(res)), p)
    assert "reviews-mezo-s0" in plan and f"lr pick reviews-mezo: {pick['lr']:.3g} on the grid's edge" in plan


def test_pick_rule_on_hand_made_scans(tmp_path):
    p = Protocol(tasks={"sst2": cl.TASKS["sst2"]})
    mezo = p.row("mezo")
    results = Results(tmp_path)
    scan = [c for c in cl.grid(p) if c.phase == "scan" and c.row.name == "mezo"]
    devs = [0.60, 0.70, 0.70, 0.65, 0.55]  # lr 1.25e-5 .. 2e-4: a tie at 2.5e-5 and 5e-5
    for c, d in zip(scan[:4], devs, strict=False):
        results.rows[c.name] = {"cell": c.name, "best_dev": d, "best_step": 10, "zero_shot_dev": 0.6}
    assert cl.pick_lr(p, results, "sst2", mezo) is None  # 4 of 5: no pick
    results.rows[scan[4].name] = {"cell": scan[4].name, "best_dev": devs[4], "best_step": 10, "zero_shot_dev": 0.6}
    pick = cl.pick_lr(p, results, "sst2", mezo)
    assert pick["lr"] == 2.5e-5 and pick["edge"] is False and pick["beats_zero_shot"] is True
    for c in scan:  # nothing beats zero-shot: every lr ties at step 0's dev; the smallest lr, flagged
        results.rows[c.name]["best_dev"] = 0.6
    pick = cl.pick_lr(p, results, "sst2", mezo)
    assert pick["lr"] == 1.25e-5 and pick["edge"] is True and pick["beats_zero_shot"] is False
    # a grid extended past its top edge: no pick until the extra lrs ran; then the edge is the extended grid's
    wide = Protocol(tasks={"sst2": cl.TASKS["sst2"]}, rows=(replace(mezo, extra_factors=(8.0,)),))
    for c in scan:
        results.rows[c.name]["best_dev"] = 0.6 + c.factor / 100  # rising with lr: 4 x is the best of the 5
    assert cl.pick_lr(wide, results, "sst2", wide.row("mezo")) is None
    top = next(c for c in cl.grid(wide) if c.phase == "scan" and c.factor == 8.0)
    assert top.name == "sst2-mezo-scan-lr0.0004"
    results.rows[top.name] = {"cell": top.name, "best_dev": 0.6, "best_step": 10, "zero_shot_dev": 0.6}
    pick = cl.pick_lr(wide, results, "sst2", wide.row("mezo"))
    assert pick["lr"] == 2e-4 and pick["edge"] is False and len(pick["grid"]) == 6
    # the scan table names an extension only where it added lrs to the task's own grid
    assert "grid extended by × {8} after a pick on its edge" in "\n".join(
        verdicts._scan_lines(wide, {("sst2", "mezo"): pick})
    )
    inside = Protocol(tasks={"sst2": cl.TASKS["sst2"]}, rows=(replace(mezo, extra_factors=(2.0,)),))
    assert "grid extended" not in "\n".join(verdicts._scan_lines(inside, {("sst2", "mezo"): pick}))
    # the pick file follows the protocol: written when the scan is whole, removed when the grid grows past it
    cl.write_picks(wide, results)
    path = tmp_path / "lr" / "sst2-mezo.json"
    assert json.loads(path.read_text())["lr"] == 2e-4
    wider = Protocol(tasks={"sst2": cl.TASKS["sst2"]}, rows=(replace(mezo, extra_factors=(8.0, 16.0)),))
    cl.write_picks(wider, results)
    assert not path.exists()


@pytest.fixture(scope="module")
def ran(workdir, tmp_path_factory):
    """One 2-lane run of the tiny grid with one seed (two rounds of two cells: the scan, then the reference and the
    seed at the picked lr), with one cell to resume; the cells run without jsonargparse."""
    root = tmp_path_factory.mktemp("claims")
    p = tiny_protocol(workdir, seeds=(0,))
    out, res = root / "runs", root / "results"
    # the FO cell was stopped after its step-2 checkpoint; a reference copy runs uninterrupted elsewhere
    assert cl.run_cell(write_cell(p, out, "reviews-fo-full-s0", steps=2)) == 0
    (out / "reviews-fo-full-s0" / "results.json").unlink()
    assert cl.run_cell(write_cell(p, root / "reference", "reviews-fo-full-s0")) == 0
    env = {"PYTHONPATH": os.pathsep.join([block_jsonargparse(root / "site"), os.environ.get("PYTHONPATH", "")])}
    said: list[str] = []
    old = dict(os.environ)
    os.environ.update(env)
    try:
        summary = cl.run_grid(p, out, res, device="cpu", lanes=2, poll=0.2, log=said.append)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return {"p": p, "out": out, "res": res, "root": root, "summary": summary, "said": said, "env": env}


def test_run_two_lanes_resumes_and_needs_no_jsonargparse(ran):
    p, out, res, summary = ran["p"], ran["out"], ran["res"], ran["summary"]
    blocked = subprocess.run([sys.executable, "-c", "import jsonargparse"], env={**os.environ, **ran["env"]},
                             capture_output=True, text=True)  # fmt: skip
    assert blocked.returncode != 0 and "jsonargparse is not installed" in blocked.stderr  # the block works
    assert summary["counts"] == {"done": 4}, ran["said"]
    assert all(v.startswith("finished") for v in summary["outcomes"].values()) and summary["lanes"] == 2
    assert json.loads((out / "last-run.json").read_text())["counts"] == {"done": 4}
    rows = Results.load(res).rows
    assert sorted(rows) == sorted(c.name for c in cl.grid(p))
    # the resumed cell ends as the uninterrupted one did (same checkpointed state, same batches and directions)
    log = (out / "logs" / "reviews-fo-full-s0.log").read_text()
    assert "resumes from step 2" in log and "jsonargparse" not in log
    ref = json.loads((ran["root"] / "reference" / "reviews-fo-full-s0" / "results.json").read_text())
    again = json.loads((out / "reviews-fo-full-s0" / "results.json").read_text())
    assert (again["test"], again["best_dev"], again["steps"], again["forwards"]) == (
        ref["test"], ref["best_dev"], ref["steps"], ref["forwards"])  # fmt: skip
    # the seeds ran at the picked lr; every row keeps its config; scan cells keep no weights, seeds their best
    pick = json.loads((res / "lr" / "reviews-mezo.json").read_text())
    for s in p.seeds:
        kept = yaml.safe_load((res / "configs" / f"reviews-mezo-s{s}.yaml").read_text())
        assert (
            kept["mezo"]["lr"] == pick["lr"] and kept["seed"] == s and rows[f"reviews-mezo-s{s}"]["lr"] == pick["lr"]
        )
        assert (out / f"reviews-mezo-s{s}" / "best").is_dir() and not (
            out / f"reviews-mezo-s{s}" / "checkpoints"
        ).exists()
    assert not (out / "reviews-mezo-scan-lr0.01" / "best").exists()
    # the rows' dev points carry the training seconds spent before them: the sum of the steps' step_time
    row = rows["reviews-mezo-s0"]
    dev, secs = row["curves"]["dev"], row["curves"]["dev_seconds"]
    assert [f for f, _ in dev] == [f for f, _ in secs] and secs[0][1] == 0.0
    steps = [json.loads(x) for x in (out / "reviews-mezo-s0" / "metrics.jsonl").read_text().splitlines()]
    spent = sum(r["step_time"] for r in steps if r["kind"] == "train")
    assert secs[-1][1] == pytest.approx(spent, abs=1e-3) and row["device"] == "cpu" and row["forward_equivalents"] == 7
    # a second run has nothing left to do
    again = cl.run_grid(p, out, res, device="cpu", lanes=2, poll=0.2, log=lambda m: None)
    assert again["outcomes"] == {} and again["counts"] == {"done": 4}


def test_pack_and_unpack_carry_finished_cells_without_weights(ran, tmp_path):
    p, out, res = ran["p"], ran["out"], ran["res"]
    info = cl.pack(out, tmp_path / "burst.tar.gz")
    with tarfile.open(tmp_path / "burst.tar.gz") as tar:
        names = tar.getnames()
    assert len(info["cells"]) == 4 and all(burst._MEMBER.match(n) for n in names)
    assert not any("best" in n or "checkpoints" in n or n.endswith(".safetensors") for n in names)
    assert "runs/reviews-mezo-s0/updates.jsonl" in names and "logs/reviews-mezo-s0.log" in names
    here, here_res = tmp_path / "here", tmp_path / "here-results"
    (here / "reviews-fo-full-s0").mkdir(parents=True)  # a local copy of one cell stays as it is
    (here / "reviews-fo-full-s0" / "config.yaml").write_text(yaml.safe_dump({"mine": 1}))
    said: list[str] = []
    got = cl.unpack(tmp_path / "burst.tar.gz", here, here_res, p, log=said.append)
    assert got["kept_local"] == ["reviews-fo-full-s0"] and len(got["unpacked"]) == 3
    assert sorted(got["summarized"]) == sorted(n for n in info["cells"] if n != "reviews-fo-full-s0")
    assert yaml.safe_load((here / "reviews-fo-full-s0" / "config.yaml").read_text()) == {"mine": 1}
    assert any("kept the local" in m for m in said)
    mine, theirs = Results.load(here_res).rows, Results.load(res).rows
    assert all(mine[n]["test"] == theirs[n]["test"] and mine[n]["curves"] == theirs[n]["curves"] for n in mine)
    assert (here / "logs" / "unpacked" / "reviews-mezo-s0.log").is_file()
    # a tarball with anything else (a weights file, a path out of the folder) is refused whole
    for bad_name in ("runs/reviews-mezo-s0/best/step-3/trainable.safetensors", "../escape.log"):
        bad = tmp_path / "bad.tar.gz"
        with tarfile.open(bad, "w:gz") as tar:
            tar.add(out / "reviews-mezo-s0" / "results.json", arcname="runs/reviews-x/results.json")
            tar.add(out / "reviews-mezo-s0" / "results.json", arcname=bad_name)
        with pytest.raises(ValueError, match="unexpected member"):
            cl.unpack(bad, tmp_path / "elsewhere", tmp_path / "elsewhere-res", p)
        assert not (tmp_path / "elsewhere" / "reviews-x").exists()


def test_results_saved_by_two_processes_keep_each_others_rows(tmp_path):
    driver, beside = Results.load(tmp_path), Results.load(tmp_path)  # both loaded before either saves
    driver.rows["a"] = {"cell": "a", "test": 0.5}
    driver.save(["a", "b"])
    beside.rows["b"] = {"cell": "b", "test": 0.6}
    beside.save(["a", "b"])  # a summarize beside a running driver
    driver.rows["a"]["test"] = 0.7
    driver.save(["a", "b"])  # the driver's next cell: b stays, a is the driver's
    assert {k: r["test"] for k, r in Results.load(tmp_path).rows.items()} == {"a": 0.7, "b": 0.6}


def test_check_reruns_a_committed_row_from_its_config(workdir, tmp_path):
    p = tiny_protocol(workdir)
    out, res = tmp_path / "runs", tmp_path / "results"
    name = "reviews-mezo-scan-lr0.01"
    assert cl.run_cell(write_cell(p, out, name)) == 0
    assert cl.summarize_finished(p, out, Results.load(res), log=lambda m: None) == [name]
    got = cl.check_cell(res, name, tmp_path / "check", forwards=6)
    assert got["ok"] and got["same_device"] and got["steps_compared"] == 2 and got["max_abs_loss_diff"] < 1e-5, got
    assert 0 < got["train_peak_mem_mb"] <= got["peak_mem_mb"], got  # the steps' peak, and the process's
    assert got["median_step_seconds"] > 0
    cli = ["check", name, "--results", str(res), "--forwards", "6", "--into", str(tmp_path / "c"), "--record"]
    assert cl.main(cli) == 0
    (rec,) = [json.loads(line) for line in (res / "checks.jsonl").read_text().splitlines()]
    assert rec["ok"] and rec["command"] == f"python -m zotune.bench.claims check {name} --forwards 6"
    # a kept config that no longer says what ran (another lr) is caught by the losses after the first update
    cfg = res / "configs" / f"{name}.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.01", "lr: 0.02", 1))
    bad = cl.check_cell(res, name, tmp_path / "check2", forwards=6)
    assert not bad["ok"] and bad["max_abs_loss_diff"] > 1e-5, bad
    # a row from another device: the zero-shot dev and the first step judged (to 1e-2), the rest reported
    cfg.write_text(cfg.read_text().replace("lr: 0.02", "lr: 0.01", 1))
    results = Results.load(res)
    results.rows[name]["device"] = "cuda:0"
    results.save([name])
    other = cl.check_cell(res, name, tmp_path / "check4", forwards=6)
    assert not other["same_device"] and (other["steps_judged"], other["tolerance"]) == (1, 1e-2) and other["ok"]
    # a CPU row logged on another instruction set: judged as from another device
    assert results.rows[name]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    results.rows[name] |= {"device": "cpu", "cpu_capability": "NO-SIMD"}
    results.save([name])
    isa = cl.check_cell(res, name, tmp_path / "check6", forwards=6)
    assert not isa["same_device"] and isa["steps_judged"] == 1 and isa["row_cpu_capability"] == "NO-SIMD", isa
    results.rows[name]["zero_shot_dev"] += 0.1  # another model or data: caught by the zero-shot dev
    results.save([name])
    assert not cl.check_cell(res, name, tmp_path / "check5", forwards=6)["ok"]
    with pytest.raises(ValueError, match="not empty"):
        cl.check_cell(res, name, tmp_path / "check", forwards=4)
    with pytest.raises(ValueError, match="no row 'reviews-mezo-s9'"):
        cl.check_cell(res, "reviews-mezo-s9", tmp_path / "check3")


def test_deadline_stops_launching_and_stops_a_running_cell(workdir, tmp_path):
    p = tiny_protocol(workdir, budget=10**6, ref_budget=10**6, eval_forwards=40, ref_eval_forwards=20)  # no end
    p = without_watchdog(p, tmp_path)  # only the deadline ends a cell here
    out, res = tmp_path / "runs", tmp_path / "results"
    nothing = cl.run_grid(p, out, res, device="cpu", lanes=2, deadline=0, log=lambda m: None)
    assert nothing["outcomes"] == {} and nothing["stopped"].startswith("deadline")
    assert not (out / "cells").exists()
    said: list[str] = []
    # nothing has finished on this device, so nothing to estimate from: FO full starts, and the deadline stops it
    got = cl.run_grid(p, out, res, device="cpu", lanes=2, only=["*-fo-full-s0"], deadline=10, grace=20, poll=0.2,
                      log=said.append)  # fmt: skip
    assert got["stopped"].startswith("deadline") and got["outcomes"]["reviews-fo-full-s0"].startswith("stopped"), said
    for name in ("reviews-mezo-scan-lr0.005", "reviews-mezo-scan-lr0.01"):  # a finished scan: the seeds may start
        assert cl.run_cell(write_cell(p, out, name)) == 0
    got = cl.run_grid(p, out, res, device="cpu", lanes=2, only=["*-mezo-s0", "*-fo-full-s1"], deadline=10, grace=20,
                      poll=0.2, log=said.append)  # fmt: skip
    # MeZO's seconds per forward are known from its scan: a million forwards do not fit in 10 s, so it never starts
    assert got["outcomes"]["reviews-mezo-s0"].startswith("not started: needs ~"), said
    # FO full has no finished cell of its own: the slowest rate on the device (MeZO's scan) stands in for it
    assert got["outcomes"]["reviews-fo-full-s1"].startswith("not started: needs ~"), said
    sts = {s.cell.name: s for s in cl.statuses(p, out, Results.load(res))[0]}
    assert sts["reviews-fo-full-s0"].state in ("unfinished", "missing") and sts["reviews-mezo-s0"].state == "missing"
    assert not (out / "reviews-fo-full-s0" / "results.json").exists()
    assert set(Results.load(res).rows) == {"reviews-mezo-scan-lr0.005", "reviews-mezo-scan-lr0.01"}
    # carry-over: the same cell starts although it cannot finish; the deadline stops it with a checkpoint to resume
    said.clear()
    got = cl.run_grid(p, out, res, device="cpu", lanes=1, only=["*-mezo-s0"], deadline=15, grace=20, poll=0.2,
                      carry_over=True, log=said.append)  # fmt: skip
    assert got["outcomes"]["reviews-mezo-s0"].startswith("stopped"), said
    assert any("started reviews-mezo-s0 (fresh; needs ~" in m and "a later run resumes it" in m for m in said), said
    st = {s.cell.name: s for s in cl.statuses(p, out, Results.load(res))[0]}["reviews-mezo-s0"]
    assert st.state == "unfinished" and st.forwards_done > 0, (st, said)
    # the run ends by parking it in RESULTS/parked without the weights its update log rebuilds; a fresh checkout
    # (no OUT folder) resumes it from there: copied back, weights replayed and checked against their sha256
    parked = res / "parked" / "reviews-mezo-s0"
    assert any(f"reviews-mezo-s0: parked at step {st.resume_step} in" in m for m in said), said
    assert (parked / "updates.jsonl").is_file() and not list(parked.rglob("trainable.safetensors"))
    shutil.rmtree(out / "reviews-mezo-s0")
    again = {s.cell.name: s for s in cl.statuses(p, out, Results.load(res))[0]}["reviews-mezo-s0"]
    assert again.state == "unfinished" and again.resume_step == st.resume_step and "parked in" in again.detail
    said.clear()
    got = cl.run_grid(p, out, res, device="cpu", lanes=1, only=["*-mezo-s0"], deadline=15, grace=20, poll=0.2,
                      carry_over=True, log=said.append)  # fmt: skip
    assert any("reviews-mezo-s0: copied from" in m for m in said), said
    cell_log = (out / "logs" / "reviews-mezo-s0.log").read_text()
    assert f"rebuilt from {st.resume_step} logged steps (sha256 as recorded)" in cell_log, cell_log[-2000:]
    later = {s.cell.name: s for s in cl.statuses(p, out, Results.load(res))[0]}["reviews-mezo-s0"]
    assert later.resume_step > st.resume_step, (later, said)  # it went on from there
    assert cl.results.checkpoint_step(parked) == later.resume_step  # and the parked copy moved with it


def test_cells_start_in_the_order_of_the_only_globs(workdir, tmp_path):
    p = tiny_protocol(workdir, budget=10**6, ref_budget=10**6, eval_forwards=40, ref_eval_forwards=20)  # no end
    p = without_watchdog(p, tmp_path)
    out, res = tmp_path / "runs", tmp_path / "results"
    said: list[str] = []
    # grid order puts the scans first; the globs put the FO reference first, so on one lane it is the one started
    got = cl.run_grid(p, out, res, device="cpu", lanes=1, only=["*-fo-full-s0", "*-mezo-scan-*"], deadline=3,
                      grace=20, poll=0.2, log=said.append)  # fmt: skip
    started = [m.split("started ")[1].split(" ")[0] for m in said if " started " in m]
    assert started == ["reviews-fo-full-s0"], said
    assert got["outcomes"]["reviews-fo-full-s0"].startswith("stopped"), said


def hand_made(tmp_path: Path, tests: dict[str, list[float]], **extra) -> tuple[Protocol, Results]:
    """Results of the real protocol's SST-2 grid made by hand: scans (MeZO-like dev), seeds and refs with the
    given test accuracies per row (rows not given are left out), each with its kept config."""
    p = Protocol(tasks={"sst2": cl.TASKS["sst2"]})
    results = Results(tmp_path / "res")
    for c in cl.grid(p):
        if c.row.name not in tests:
            continue
        if c.phase == "scan":
            row = {"best_dev": 0.7 if c.factor == 1.0 else 0.6, "best_step": 100}
        else:
            acc = tests[c.row.name][c.seed]
            if acc is None:
                continue
            dev = extra.get("dev", {}).get(c.row.name, [[0, 0.58], [400, 0.64], [800, 0.70], [2000, 0.72]])
            step_s = extra.get("step", {}).get(c.row.name, 1.0)
            row = {"test": acc, "best_dev": max(a for _, a in dev), "best_step": 10, "test_n": 872,
                   "curves": {"dev": dev, "dev_seconds": [[f, f * step_s / 2] for f, _ in dev]},
                   "median_step_seconds": step_s, "peak_mem_mb": extra.get("peak", {}).get(c.row.name, 1000.0),
                   "device": "cpu", "rows_per_forward": 1, "forward_equivalents": dev[-1][0]}  # fmt: skip
        row |= {"cell": c.name, "run": c.name, "task": "sst2", "row": c.row.name, "phase": c.phase, "seed": c.seed,
                "zero_shot_dev": 0.585, "zero_shot_test": 0.516}  # fmt: skip
        results.rows[c.name] = row
    for name in results.rows:
        c = cell_named(p, name)
        lr = cl.picks(p, results).get((c.task, c.row.name), {}).get("lr")
        path = results.config_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cl.expected_config(c, p, lr)))
    results.save([c.name for c in cl.grid(p)])
    return p, results


def test_verdict_rule():
    assert cl.verdict([0.03, 0.04, 0.05])[0] == "holds"
    assert cl.verdict([-0.03, -0.04, -0.05])[0] == "does not hold at this scale"
    assert cl.verdict([0.05, -0.01, 0.02])[0].startswith("inconclusive")  # mean 0.02 < std 0.03
    assert cl.verdict([0.0, 0.0, 0.0])[0].startswith("inconclusive")
    assert cl.verdict([0.01, 0.01, 0.01]) == ("holds", 0.01, 0.0)
    _, m, s = cl.verdict([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)
    assert cl.verdict([0.0, 2.0, 1.0])[0].startswith("inconclusive")  # mean == std: the boundary is inconclusive
    assert cl.verdict([0.1, 2.0, 1.0])[0] == "holds" and cl.verdict([-0.1, -2.0, -1.0])[0].startswith("does not")
    assert cl.verdict([0.0, 2.0, -0.5])[0].startswith("inconclusive")  # mean 0.5 < std 1.32
    # the same side on every seed decides, however skewed: -4.7, -0.75, -0.75 has mean -2.1 and std 2.3
    assert cl.verdict([-4.74, -0.75, -0.75])[0] == "does not hold at this scale"
    assert cl.verdict([0.001, 0.002, 0.1])[0] == "holds"  # mean 0.034 < std 0.057, but positive on every seed
    with pytest.raises(ValueError):
        cl.verdict([0.1])


def test_claims_table_verdicts_missing_cells_and_why(tmp_path):
    tests = {
        "mezo": [0.70, 0.72, 0.71],
        "lozo": [0.75, 0.76, 0.77],  # + 0.05 over MeZO on every seed: holds
        "lozo-m": [0.68, 0.69, 0.70],  # - 0.02 on every seed: does not hold
        "mezo-svrg": [0.80, 0.60, 0.71],  # + 0.0 ± 0.1: inconclusive
        "senszoq": [0.72, 0.73, None],  # a seed missing: no verdict, no mean
        "zofo": [0.86, 0.85, 0.87],
        "fo-lora": [0.84, 0.84, 0.84],
        "fo-full": [0.87, 0.86, 0.88],
    }
    dev = {"mezo-svrg": [[0, 0.58], [200, 0.66], [400, 0.72], [2000, 0.73]]}  # reaches 0.72 at 400 of MeZO's 2000
    p, results = hand_made(tmp_path, tests, dev=dev)
    rows = {(c.id, t): cl.compare(c, p, results, t) for c in p.comparisons for t in p.tasks}
    assert rows[("1a", "sst2")]["verdict"] == "holds" and rows[("1a", "sst2")]["mean"] == pytest.approx(0.05)
    assert rows[("1b", "sst2")]["verdict"] == "does not hold at this scale"
    assert rows[("2a", "sst2")]["verdict"].startswith("inconclusive")
    # 2b: MeZO first reaches its peak dev (0.72) at 2000 forwards, SVRG at 400: ratio 0.2 ≤ 0.6 on every seed
    assert rows[("2b", "sst2")]["verdict"] == "holds" and rows[("2b", "sst2")]["x"] == pytest.approx([0.4] * 3)
    assert rows[("3a", "sst2")]["missing"] == "missing: senszoq 2 of 3 seeds, mezo 3 of 3"
    assert rows[("3d", "sst2")]["missing"] == (
        "missing: senszoq-fp32base 0 of 3 seeds, mezo 3 of 3 (senszoq-fp32base runs in the gpu profile only)"
    )
    assert rows[("4a", "sst2")]["verdict"] == "holds"  # + 0.02 ± 0.01 over FO-LoRA
    assert rows[("4b", "sst2")]["b"] == "lozo" and rows[("4b", "sst2")]["verdict"] == "holds"
    # the best pure-ZO row (LOZO, 0.76) against FO full (0.87): 0.11 below, far outside 3 points
    assert rows[("5", "sst2")]["a"] == "lozo" and rows[("5", "sst2")]["verdict"] == "does not hold at this scale"
    (results.folder / "why.yaml").write_text(yaml.safe_dump({"1b/sst2": "LOZO-M's momentum lags at this lr."}))
    text = cl.table(results.folder, p)
    assert (results.folder / "claims.md").read_text() == text
    assert "| 1a | sst2 | LOZO > MeZO (test) | 0.760 ± 0.010 | 0.710 ± 0.010 | +0.050 ± 0.010 |" in text
    assert "| **does not hold at this scale** | LOZO-M's momentum lags at this lr. |" in text
    assert "missing: senszoq 2 of 3 seeds" in text
    assert "| missing (2 of 3 seeds) | 0.720 / 0.730 / missing | — | — | — | — | — | cpu |" in text
    # a row of the other profile with no cell run is shown as such, a profile's row with nothing run as unfinished
    assert "| SensZOQ (0.1 % Fisher, fp32 base) | sequential | not run (gpu profile only) | missing (0 of 3" in text
    assert "| one probe per example (packed) | packed | scan unfinished | missing (0 of 3 seeds) |" in text
    assert "#### sst2 (test n = 872; zero-shot test 0.516" in text
    assert (
        "Best pure-ZO method on sst2: **LOZO**, test 0.760 ± 0.010" in text
        and "committed FO full 0.869: 0.109" in text
    )
    assert "(../../benchmarks/README.md#claims-grid-protocol)" not in text  # links are relative to RESULTS
    assert os.path.isfile(results.folder / text.split("Protocol: [benchmarks/README.md, Claims grid: protocol](")[1]
                          .split("#")[0])  # fmt: skip
    # forwards to MeZO's peak dev: SVRG 400 on every seed; LOZO-M (same curve as MeZO) 800
    assert "| MeZO-SVRG | sequential | 5e-05 | 0.703 ± 0.100 | 0.800 / 0.600 / 0.710 | 0.730 | 400 | 200 |" in text
    # a seed whose dev never reaches its MeZO seed's peak: no mean, the count of seeds that did
    results.rows["sst2-mezo-svrg-s1"]["curves"]["dev"] = [[0, 0.58], [2000, 0.71]]
    results.save(list(results.rows))
    text = cl.table(results.folder, p)
    assert "| 0.730 | reached by 2 of 3 seeds | reached by 2 of 3 seeds |" in text
    # a typo in why.yaml is refused, not dropped
    (results.folder / "why.yaml").write_text(yaml.safe_dump({"1x/sst2": "?"}))
    with pytest.raises(ValueError, match="unknown key '1x/sst2'"):
        cl.table(results.folder, p)


def test_memory_verdict_compares_the_training_phase_peak_from_rows_or_memory_checks(tmp_path):
    # process peaks that include SensZOQ's set-up (its Fisher pass): 1,700 against 1,400 MiB
    tests = {"mezo": [0.70, 0.72, 0.71], "senszoq": [0.72, 0.73, 0.74]}
    p, results = hand_made(tmp_path, tests, peak={"mezo": 1400.0, "senszoq": 1700.0})
    c3 = next(c for c in p.comparisons if c.id == "3c")
    got = cl.compare(c3, p, results, "sst2")
    assert got["missing"].startswith("missing: the training phase's peak of sst2-senszoq-s0, ") and "x" not in got
    checks = [{"cell": f"sst2-{row}-s{s}", "device": "cpu", "train_peak_mem_mb": peak, "ok": True}
              for row, peak in (("mezo", 1000.0), ("senszoq", 700.0)) for s in (0, 1, 2)]  # fmt: skip
    checks.append({"cell": "sst2-senszoq-s2", "device": "cuda:0", "train_peak_mem_mb": 2000.0})  # another device
    (results.folder / "checks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checks))
    got = cl.compare(c3, p, Results.load(results.folder), "sst2")
    assert got["verdict"] == "holds" and got["x"] == pytest.approx([0.3] * 3), got
    assert got["shown"][2] == "ratio 0.70 ± 0.00 (training phase, from the memory checks on cpu)"
    # rows that log their training phase's peak are compared on it, the checks left aside
    for row in results.rows.values():
        if row["phase"] == "seeds":
            row["train_peak_mem_mb"] = 900.0 if row["row"] == "mezo" else 990.0
    results.save(list(results.rows))
    got = cl.compare(c3, p, Results.load(results.folder), "sst2")
    assert got["x"] == pytest.approx([-0.1] * 3) and "from the rows" in got["shown"][2]
    assert got["verdict"] == "does not hold at this scale"


def test_step_verdict_prefers_paired_timing_checks_and_compares_across_devices_only_through_them(tmp_path):
    # the rows' own medians: SensZOQ 1.0 s against MeZO's 0.5 s, on one CPU
    tests = {"mezo": [0.70, 0.72, 0.71], "senszoq": [0.72, 0.73, 0.74]}
    p, results = hand_made(tmp_path, tests, step={"mezo": 0.5, "senszoq": 1.0})
    c3b = next(c for c in p.comparisons if c.id == "3b")
    got = cl.compare(c3b, p, results, "sst2")
    assert got["x"] == pytest.approx([-1.0] * 3) and got["shown"][2] == "ratio 2.00 ± 0.00 (from the rows)"
    # timing checks of every cell on the CPU (one older, superseded by a newer one) decide over the rows
    checks = [{"cell": f"sst2-{row}-s{s}", "device": "cpu", "median_step_seconds": t}
              for row, t in (("senszoq", 9.0), ("mezo", 4.0), ("senszoq", 2.0)) for s in (0, 1, 2)]  # fmt: skip
    (results.folder / "checks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checks[:-1]))
    got = cl.compare(c3b, p, Results.load(results.folder), "sst2")
    # seed 2's newest SensZOQ check is still the 9 s one
    assert got["x"] == pytest.approx([0.5, 0.5, 1 - 9 / 4]) and "from the timing checks on cpu" in got["shown"][2]
    (results.folder / "checks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checks))
    got = cl.compare(c3b, p, Results.load(results.folder), "sst2")
    assert got["x"] == pytest.approx([0.5] * 3) and got["verdict"] == "holds"
    # rows on different devices are compared only through checks on one device type
    for row in results.rows.values():
        if row["row"] == "mezo" and row["phase"] == "seeds":
            row["device"] = "cuda:0"
    results.save(list(results.rows))
    no_mezo = [c for c in checks if "mezo" not in c["cell"]]
    (results.folder / "checks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in no_mezo))
    got = cl.compare(c3b, p, Results.load(results.folder), "sst2")
    assert got["missing"].startswith("not comparable: ran on different devices (cpu, cuda:0), and not every cell")
    assert "x" not in got
    checks.append({"cell": "sst2-mezo-s0", "device": "cuda:0", "median_step_seconds": 0.1})  # another type: unused
    (results.folder / "checks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checks))
    got = cl.compare(c3b, p, Results.load(results.folder), "sst2")
    assert got["x"] == pytest.approx([0.5] * 3) and "on cpu" in got["shown"][2]


def test_reach_counts_a_run_stopped_early_at_its_full_budget(tmp_path):
    # MeZO peaks (0.72) at 400 forwards; n-SPSA diverged and was stopped at 80 forwards without reaching it
    dev = {"mezo": [[0, 0.58], [400, 0.72], [2000, 0.72]], "nspsa4": [[0, 0.58], [80, 0.50]]}
    p, results = hand_made(tmp_path, {"mezo": [0.7] * 3, "nspsa4": [0.5] * 3}, dev=dev)
    res = cl.compare(next(c for c in p.comparisons if c.id == "6a"), p, results, "sst2")
    # 2000 / 400 = 5 times MeZO's forwards (not 80 / 400 = 0.2, which would have read as 'holds')
    assert res["x"] == pytest.approx([0.25 - 5.0] * 3) and res["verdict"] == "does not hold at this scale"
    assert res["shown"][0].startswith("2000 forwards (3 not reached")


def test_a_row_on_one_task_only_has_no_cells_pick_or_claim_on_the_others(tmp_path):
    p, results = hand_made(tmp_path, {"mezo": [0.70, 0.72, 0.71], "nspsa4": [0.60, 0.61, 0.62]})
    p = replace(p, tasks=cl.TASKS)  # SST-2 and TREC; n-SPSA runs on SST-2 only
    assert p.row("nspsa4").tasks == ("sst2",) and not p.row("mezo").tasks
    cells = cl.grid(p)
    assert {c.task for c in cells if c.row.name == "nspsa4"} == {"sst2"}
    assert {c.task for c in cells if c.row.name == "mezo"} == {"sst2", "trec"}
    assert ("sst2", "nspsa4") in cl.picks(p, results) and ("trec", "nspsa4") not in cl.picks(p, results)
    text = cl.table(results.folder, p)
    trec = text.split("#### trec")[1].split("###")[0]
    assert "| MeZO |" in trec and "n-SPSA" not in trec
    assert "| 6a | sst2 |" in text and "| 6a | trec |" not in text  # no comparison of a row that does not run there
    assert "| 1a | trec |" in text  # the papers' rows are compared on both tasks


def test_plan_gives_the_cell_time_left_at_each_devices_measured_rates(tmp_path):
    p, results = hand_made(tmp_path, {"mezo": [0.70, 0.72, 0.71]})
    for name, row in results.rows.items():  # MeZO at 0.5 s per forward on the CPU
        row |= {"seconds": 0.5 * cl.budget_of(cell_named(p, name), p), "forward_equivalents": cl.budget_of(
            cell_named(p, name), p), "device": "cpu"}  # fmt: skip
    sts, chosen = cl.statuses(p, tmp_path / "runs", results)
    sts = [st for st in sts if st.cell.row.name in ("mezo", "lozo")]
    # LOZO has no finished cell: charged the slowest measured rate (MeZO's); 5 scan lrs of 500, 3 seeds of 2000
    assert cl.cell_time_left(sts, p, results, "cpu") == pytest.approx({"scan": 0.5 * 5 * 500, "seeds": 0.5 * 3 * 2000})
    assert cl.cell_time_left(sts, p, results, "cuda") == {}  # nothing measured there
    plan = cl.format_plan(sts, chosen, p, results)
    assert "cell time left on cpu at its measured rates: 1.2 h (scan 0.3 h, seeds 0.8 h)" in plan
    assert "on cuda" not in plan


def test_a_cells_estimate_uses_the_rate_of_the_method_it_runs_on_its_task(tmp_path):
    # LOZO-M runs sequential on SST-2 and packed on TREC: a TREC seed cell is charged the packed TREC rate, not the
    # row's SST-2 one (which would keep it from starting in time it fits)
    results = Results(tmp_path)
    for name, method, rate in (("sst2-lozo-m-s0", "lozo_m", 3.6), ("trec-lozo-m-scan-lr2.5e-05", "packed_lozo_m",
                               1.4), ("sst2-mezo-s0", "mezo", 5.0)):  # fmt: skip
        c = cell_named(cl.PROTOCOL, name)
        assert c.method == method
        budget = cl.budget_of(c, cl.PROTOCOL)
        results.rows[name] = {"cell": name, "row": c.row.name, "task": c.task, "method": method, "device": "cpu",
                              "seconds": rate * budget, "forward_equivalents": budget}  # fmt: skip
    trec = cell_named(cl.PROTOCOL, "trec-lozo-m-s1")
    assert trec.method == "packed_lozo_m"
    half = cl.Status(trec, "unfinished", forwards_done=500)
    assert driver._estimate(trec, half, cl.PROTOCOL, results, "cpu") == pytest.approx(1.4 * 1500)
    sst2 = cell_named(cl.PROTOCOL, "sst2-lozo-m-s1")
    assert driver._estimate(sst2, cl.Status(sst2, "missing"), cl.PROTOCOL, results, "cpu") == pytest.approx(3.6 * 2000)
    # the row measured only with another method: that rate; a row never measured: the slowest rate
    del results.rows["trec-lozo-m-scan-lr2.5e-05"]
    assert driver._estimate(trec, half, cl.PROTOCOL, results, "cpu") == pytest.approx(3.6 * 1500)
    trec_mezo = cell_named(cl.PROTOCOL, "trec-mezo-s0")
    assert driver._estimate(trec_mezo, cl.Status(trec_mezo, "missing"), cl.PROTOCOL, results, "cpu") == pytest.approx(
        5.0 * 2000
    )
    lozo = cell_named(cl.PROTOCOL, "trec-lozo-s0")
    assert driver._estimate(lozo, cl.Status(lozo, "missing"), cl.PROTOCOL, results, "cpu") == pytest.approx(5.0 * 2000)
    # a seed run resumed across processes: its last process's seconds are a part; the loop's summed seconds count
    results.rows["sst2-lozo-m-s0"] |= {"seconds": 0.5 * 2000, "train_seconds": 3.5 * 2000}
    assert driver._estimate(sst2, cl.Status(sst2, "missing"), cl.PROTOCOL, results, "cpu") == pytest.approx(3.5 * 2000)


def test_methods_table_shows_no_seconds_or_memory_across_devices(tmp_path):
    p, results = hand_made(tmp_path, {"mezo": [0.70, 0.72, 0.71], "lozo": [0.75, 0.76, 0.77]})
    (same,) = [ln for ln in cl.methods_table(p, results, "sst2", cl.picks(p, results)) if ln.startswith("| LOZO |")]
    assert same.endswith("| 1.000 | 1000 | cpu |"), same  # one device: step seconds and peak shown
    results.rows["sst2-lozo-s2"]["device"] = "cuda:0"
    (mixed,) = [ln for ln in cl.methods_table(p, results, "sst2", cl.picks(p, results)) if ln.startswith("| LOZO |")]
    assert mixed.endswith("| — (mixed devices) | — (mixed devices) | s0: cpu, s1: cpu, s2: cuda:0 |"), mixed
    assert "| 0.760 ± 0.010 |" in mixed  # accuracy still compares across devices


def test_table_draws_every_seed_curve_and_links_the_figure(tmp_path):
    import matplotlib.image

    tests = {"mezo": [0.70, 0.72, 0.71], "lozo": [0.75, None, None]}
    dev = {"lozo": [[0, 0.58], [200, 0.62], [400, 0.75]]}
    p, results = hand_made(tmp_path, tests, dev=dev)
    text = cl.table(results.folder, p)
    fig = results.folder / "curves-sst2.png"
    assert "[curves-sst2.png](curves-sst2.png)" in text
    img = matplotlib.image.imread(fig)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.01  # a drawn figure, not a blank canvas
    assert not [f for f in results.folder.iterdir() if f.name.startswith(".")]  # no temporary left behind
    # scans only (no seed rows yet): a table without a figure or a link
    p2, results2 = hand_made(tmp_path / "b", {"mezo": [None, None, None]})
    assert results2.rows and "curves-" not in cl.table(results2.folder, p2)
    assert not (results2.folder / "curves-sst2.png").exists()


def test_table_refuses_rows_off_the_protocol_or_without_configs(tmp_path, capsys):
    tests = {"mezo": [0.7, 0.71, 0.72], "fo-full": [0.87, 0.86, 0.88]}
    p, results = hand_made(tmp_path, tests)
    assert "| MeZO |" in cl.table(results.folder, p)
    before = (results.folder / "claims.md").read_text()
    cfg = results.config_path("sst2-mezo-s1")
    tree = yaml.safe_load(cfg.read_text())
    tree["seed"], tree["train"]["max_forwards"] = 5, 1000
    cfg.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match=r"sst2-mezo-s1: config differs from the protocol: train.max_forwards 1000 "
                                         r"\(protocol: 2000\); seed 5 \(protocol: 1\)"):  # fmt: skip
        cl.table(results.folder, p)
    cfg.unlink()
    with pytest.raises(ValueError, match=r"sst2-mezo-s1: its config is not kept \(.*configs/sst2-mezo-s1.yaml"):
        cl.table(results.folder, p)
    assert (results.folder / "claims.md").read_text() == before  # nothing written
    # the plan shows the row as a conflict, not as done
    sts = {s.cell.name: s for s in cl.statuses(p, tmp_path / "none", Results.load(results.folder))[0]}
    assert sts["sst2-mezo-s1"].state == "conflict" and sts["sst2-mezo-s0"].state == "done"
    # the command line: one line, exit 2
    assert cl.main(["table", "--results", str(results.folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its config is not kept" in err
    assert cl.main(["run", "--lanes", "0", "--results", str(results.folder), "--out", str(tmp_path / "o")]) == 2
    assert "--lanes 0: must be at least 1" in capsys.readouterr().err


def test_report_page_gets_the_claims_section(tmp_path):
    from zotune.bench.report import report

    tests = {"mezo": [0.7, 0.71, 0.72], "lozo": [0.75, 0.76, 0.77], "fo-full": [0.87, 0.86, 0.88]}
    p, results = hand_made(tmp_path, tests)
    suite = Path(SRC).parent / "benchmarks" / "results" / "suite-smollm2"  # the committed accuracy rows
    page = report([suite], [], tmp_path / "docs" / "results.md", claims=results.folder, claims_protocol=p)
    assert "## Do the papers' claims hold? (SmolLM2-135M, seeds 0, 1, 2)" in page
    assert "| 1a | sst2 | LOZO > MeZO (test) |" in page and "](../res/runs.jsonl)" in page


def test_stability_rule_sets_aside_diverged_seeds_and_moves_the_pick_below(tmp_path):
    tests = {"mezo": [0.70, 0.71, 0.69], "fo-full": [0.87, 0.86, 0.88]}
    p, results = hand_made(tmp_path, tests)
    scan = {c.factor: c.name for c in cl.grid(p) if c.phase == "scan" and c.row.name == "mezo"}
    results.rows[scan[0.5]]["best_dev"] = 0.65  # the best lr below the scan's pick (5e-5): 2.5e-5
    for s in (0, 1, 2):
        results.rows[f"sst2-mezo-s{s}"] |= {"lr": 5e-5, "stopped": "forward-pass budget reached"}
    results.rows["sst2-mezo-s1"]["stopped"] = "watchdog: the loss 31.1 stayed above 10"
    results.save([c.name for c in cl.grid(p)])
    out = tmp_path / "runs"
    for name in ("sst2-mezo-s2", "sst2-mezo-s0"):  # an old unfinished folder; a running one (busy below)
        (out / name).mkdir(parents=True)
        (out / name / "config.yaml").write_text(yaml.safe_dump(cl.expected_config(cell_named(p, name), p, 5e-5)))
    assert cl.pick_lr(p, results, "sst2", p.row("mezo"))["lr"] == 2.5e-5  # the pick moves at once
    moved = cl.set_aside_unstable(p, results, out, busy=["sst2-mezo-s0"])
    assert sorted(moved) == ["sst2-mezo-s0", "sst2-mezo-s1", "sst2-mezo-s2"]  # every seed at 5e-5, not only s1
    on_disk = Results.load(results.folder)  # runs.jsonl lost them (not taken back by the merge on save)
    seeds = {"sst2-mezo-s0", "sst2-mezo-s1", "sst2-mezo-s2"}
    assert not seeds & set(on_disk.rows) and "sst2-fo-full-s0" in on_disk.rows and scan[1.0] in on_disk.rows
    assert sorted(r["cell"] for r in on_disk.superseded) == ["sst2-mezo-s0", "sst2-mezo-s1", "sst2-mezo-s2"]
    assert (results.folder / "configs" / "superseded" / "sst2-mezo-s1-lr5e-05.yaml").is_file()
    assert not results.config_path("sst2-mezo-s1").exists()
    assert (out / "superseded" / "sst2-mezo-s2-lr5e-05" / "config.yaml").is_file() and not (
        out / "sst2-mezo-s2"
    ).exists()
    assert (out / "sst2-mezo-s0" / "config.yaml").is_file()  # busy: left alone
    assert cl.set_aside_unstable(p, on_disk, None) == [] and len(on_disk.superseded) == 3  # idempotent
    sts = {s.cell.name: s for s in cl.statuses(p, tmp_path / "none", on_disk)[0]}
    assert sts["sst2-mezo-s1"].state == "missing"
    assert cl.cell_hparams(cell_named(p, "sst2-mezo-s1"), 2.5e-5)["lr"] == 2.5e-5
    text = cl.table(results.folder, p)
    assert "| MeZO | sequential | 2.5e-05 (diverged at 5e-05) | missing (0 of 3 seeds)" in text
    assert "Runs set aside (left out of every comparison" in text
    assert (
        "| sst2-mezo-s1 | 5e-05 | 0.720 | 0.710 | — | watchdog: the loss 31.1 stayed above 10 | stability rule "
        "(stopped by the watchdog) |" in text
    )
    # a set-aside row without its config is refused, as any row is
    (results.folder / "configs" / "superseded" / "sst2-mezo-s0-lr5e-05.yaml").unlink()
    with pytest.raises(ValueError, match=r"sst2-mezo-s0 \(set aside\): its config is not kept"):
        cl.table(results.folder, p)
    # the new pick diverges too: down again; once every lr has, no pick, and the seeds say why
    on_disk.superseded.append({**on_disk.superseded[1], "lr": 2.5e-5})
    assert cl.pick_lr(p, on_disk, "sst2", p.row("mezo"))["lr"] == 1.25e-5
    on_disk.superseded.append({**on_disk.superseded[1], "lr": 1.25e-5})
    pick = cl.pick_lr(p, on_disk, "sst2", p.row("mezo"))
    assert pick["lr"] is None and pick["unstable"] == [1.25e-5, 2.5e-5, 5e-5]
    sts = {s.cell.name: s for s in cl.statuses(p, tmp_path / "none", on_disk)[0]}
    assert sts["sst2-mezo-s0"].state == "waiting" and "no stable lr" in sts["sst2-mezo-s0"].detail


def test_stability_rule_counts_a_training_loss_that_rose_and_drops_a_parked_copy_at_that_lr(tmp_path):
    """A constant step too long for the budget makes the loss drift up (FZOO's normalized step: × 1.65 over 222
    steps) without ever reaching the watchdog's 10 × rule: the lr leaves the pick all the same."""
    p, results = hand_made(tmp_path, {"mezo": [0.70, 0.71, 0.69], "fo-full": [0.87, 0.86, 0.88]})
    scan = {c.factor: c.name for c in cl.grid(p) if c.phase == "scan" and c.row.name == "mezo"}
    results.rows[scan[0.5]]["best_dev"] = 0.65
    falling = [[2 * i, 0.8 - 0.005 * i] for i in range(40)]  # last tenth ÷ first tenth ≈ 0.77
    for s in (0, 1, 2):
        results.rows[f"sst2-mezo-s{s}"] |= {
            "lr": 5e-5,
            "stopped": "forward-pass budget reached",
            "curves": {**results.rows[f"sst2-mezo-s{s}"]["curves"], "loss": falling},
        }
    mild = [[2 * i, 0.6 * (1 + 0.2 * (i >= 20))] for i in range(40)]  # × 1.20: noise-sized, not unstable
    results.rows["sst2-mezo-s2"]["curves"]["loss"] = mild
    assert cl.loss_rise(results.rows["sst2-mezo-s0"]) == pytest.approx(0.6125 / 0.7925)
    assert cl.loss_rise(results.rows["sst2-mezo-s2"]) == pytest.approx(1.2)
    assert cl.loss_rise({"curves": {"loss": falling[:9]}}) is None  # too short a curve to say
    assert cl.unstable_lrs(results, "sst2", "mezo") == [] and cl.set_aside_unstable(p, results, None) == []
    rising = [[2 * i, 0.6 + 0.01 * i] for i in range(40)]  # first tenth 0.615, last 0.975: × 1.59
    results.rows["sst2-mezo-s1"]["curves"]["loss"] = rising
    results.save([c.name for c in cl.grid(p)])
    parked = results.parked_path("sst2-mezo-s0")  # a light copy of seed 0 at the left-out lr, from another checkout
    parked.mkdir(parents=True)
    (parked / "config.yaml").write_text(yaml.safe_dump(cl.expected_config(cell_named(p, "sst2-mezo-s0"), p, 5e-5)))
    assert cl.unstable_lrs(results, "sst2", "mezo") == [5e-5]
    assert cl.pick_lr(p, results, "sst2", p.row("mezo"))["lr"] == 2.5e-5
    assert sorted(cl.set_aside_unstable(p, results, None)) == ["sst2-mezo-s0", "sst2-mezo-s1", "sst2-mezo-s2"]
    assert not parked.exists()  # restoring it would have resumed the left-out lr
    text = cl.table(results.folder, p)
    assert ("| sst2-mezo-s1 | 5e-05 | 0.720 | 0.710 | — | forward-pass budget reached | stability rule (training "
            "loss rose × 1.59 from its first tenth of steps to its last) |") in text  # fmt: skip
    assert "| sst2-mezo-s0 | 5e-05 | 0.720 | 0.700 | — | forward-pass budget reached | stability rule (another" in text
    assert "its training loss ended above 1.25 × its start" in text


def test_set_aside_by_hand_moves_a_row_its_config_and_its_run_and_the_cell_runs_again(tmp_path):
    p, results = hand_made(tmp_path, {"mezo": [None] * 3, "fo-full": [0.87, 0.86, 0.88]})  # MeZO's scan only
    scan = {c.factor: c.name for c in cl.grid(p) if c.phase == "scan" and c.row.name == "mezo"}
    out = tmp_path / "runs"
    (out / scan[1.0]).mkdir(parents=True)
    (out / scan[1.0] / "config.yaml").write_text("method: lozo\n")  # the row's run as it ran before an amendment
    before = (results.folder / "runs.jsonl").read_text()
    for bad, why, match in (("sst2-mezo-scan-lr1", "x", "not a cell of the protocol's grid"),
                            ("sst2-lozo-s0", "x", "no row in"), (scan[1.0], "  ", "say why")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cl.set_aside(p, results, out, bad, why)
    assert (results.folder / "runs.jsonl").read_text() == before and not (results.folder / "superseded.jsonl").exists()
    assert cl.pick_lr(p, results, "sst2", p.row("mezo"))["lr"] == 5e-5
    row = cl.set_aside(p, results, out, scan[1.0], "ran the sequential path before the amendment")
    assert row["why"] == "ran the sequential path before the amendment" and row["lr"] == pytest.approx(5e-5)
    on_disk = Results.load(results.folder)
    assert scan[1.0] not in on_disk.rows and [r["cell"] for r in on_disk.superseded] == [scan[1.0]]
    assert scan[0.5] in on_disk.rows and "sst2-fo-full-s0" in on_disk.rows
    assert (results.folder / "configs" / "superseded" / f"{scan[1.0]}-lr5e-05.yaml").is_file()
    assert not results.config_path(scan[1.0]).exists()
    assert (out / "superseded" / f"{scan[1.0]}-lr5e-05" / "config.yaml").read_text() == "method: lozo\n"
    assert not (out / scan[1.0]).exists()
    # the scan is unfinished again: no pick, the cell is missing, the pick file is gone
    assert cl.pick_lr(p, on_disk, "sst2", p.row("mezo")) is None
    assert not (results.folder / "lr" / "sst2-mezo.json").exists()
    sts = {s.cell.name: s for s in cl.statuses(p, out, on_disk)[0]}
    assert sts[scan[1.0]].state == "missing" and sts["sst2-mezo-s0"].detail == "lr scan 4 of 5 done"
    text = cl.table(results.folder, p)
    assert f"| {scan[1.0]} | 5e-05 | 0.700 | — | — | — | ran the sequential path before the amendment |" in text
    # through the command line, with the same refusals
    args = ["set-aside", scan[0.5], "--results", str(results.folder), "--out", str(out), "--why", "test"]
    assert cl.main(args) == 0 and scan[0.5] not in Results.load(results.folder).rows
    assert cl.main(args) == 2  # no row any more


def test_reach_reruns_a_seed_cells_first_forwards_with_dev_more_often(ran):
    p = replace(ran["p"], reach_rows=("mezo",), reach_task="reviews", reach_forwards=5, reach_every=2, reach_target=4)
    res, out = ran["res"], ran["root"] / "reach-runs"
    said: list[str] = []
    assert cl.run_reach(p, res, out, log=said.append) == ["reviews-mezo-s0-first5"]
    (row,) = Results.load(res).reach.values()
    seed = Results.load(res).rows["reviews-mezo-s0"]
    # dev at every step (2 forwards) where the grid's seed run had it every 2 steps; the same run up to there: the
    # losses of the grid's seed run, to its 6 logged decimals
    assert [f for f, _ in row["dev"]] == [0, 3, 5] and [f for f, _ in seed["curves"]["dev"]] == [0, 5, 7]
    assert row["dev"][0][1] == seed["curves"]["dev"][0][1] and row["dev"][2][1] == seed["curves"]["dev"][1][1]
    assert row["grid_loss_diff"] is not None and row["grid_loss_diff"] <= 1e-6 and row["lr"] == seed["lr"]
    kept = yaml.safe_load((res / "configs" / "reach" / "reviews-mezo-s0-first5.yaml").read_text())
    assert kept["train"]["max_forwards"] == 5 and kept["train"]["eval_every"] == 1 and kept["seed"] == 0
    assert not any(f.name in ("best", "checkpoints") for f in (out / "reach" / "reviews-mezo-s0-first5").iterdir())
    assert cl.run_reach(p, res, out, log=said.append) == [] and "recorded at lr" in said[-1]  # nothing left to do
    x = cl.reach_summary(p, Results.load(res), "mezo")
    assert x["seeds"][0]["target"] == (5, seed["curves"]["dev"][1][1])  # MeZO's last dev at <= 4 + 1 forwards
    lines = reach.reach_lines(p, Results.load(res))  # (the table needs 2 seeds for its verdicts; this grid has 1)
    assert lines[0].startswith("Sample efficiency at fine resolution") and lines[4].startswith(
        f"| MeZO | {seed['lr']:g} | "
    )
    cl.check_results(p, Results.load(res))
    # a row without its kept config is refused, as any row is
    (res / "configs" / "reach" / "reviews-mezo-s0-first5.yaml").unlink()
    with pytest.raises(ValueError, match="reviews-mezo-s0-first5 \\(reach\\): its config is not kept"):
        cl.check_results(p, Results.load(res))
    with pytest.raises(KeyError, match="no row 'nope'"):
        cl.run_reach(p, res, out, rows=["nope"])


def test_reach_verdict_from_the_interval_between_two_evaluations(tmp_path):
    assert cl.reach_interval([[0, 0.5], [25, 0.6], [50, 0.7]], 0.7) == (25, 50)
    assert cl.reach_interval([[50, 0.7], [0, 0.5], [25, 0.6]], 0.65) == (25, 50)  # any order
    assert cl.reach_interval([[0, 0.5], [25, 0.6]], 0.7) == (25, float("inf"))
    assert cl.reach_interval([[0, 0.75]], 0.7) == (0, 0)
    mezo_dev = [[0, 0.585], [201, 0.63], [401, 0.675], [601, 0.70], [2001, 0.70]]
    p, results = hand_made(tmp_path, {"mezo": [0.70] * 3, "fzoo": [0.7] * 3}, dev={"mezo": mezo_dev})
    lr = cl.picks(p, results)[("sst2", "fzoo")]["lr"]

    def reach(*curves):
        results.reach = {f"sst2-fzoo-s{s}-first100": {"run": f"sst2-fzoo-s{s}-first100", "cell": f"sst2-fzoo-s{s}",
                         "task": "sst2", "row": "fzoo", "seed": s, "lr": lr, "forwards": 100, "dev": c}
                         for s, c in enumerate(curves)}  # fmt: skip
        return cl.reach_summary(p, results, "fzoo")

    early, late, never = [[0, 0.585], [25, 0.6], [50, 0.68]], [[0, 0.585], [100, 0.66]], [[0, 0.585], [100, 0.6]]
    x = reach(early, early, early)  # (25, 50] on every seed: at most 50 <= 100
    assert x["mean"] == (25, 50) and x["verdict"] == "holds" and x["seeds"][0]["target"] == (401, 0.675)
    # not reached in the first 100: the grid's seed run (same lr) says where after; without it, never
    # seed 0 without its seed run: the scan at the pick (the same run up to 500 forwards) says where after
    assert reach(never, early, early)["seeds"][0]["interval"] == (100, float("inf"))  # the scan's dev: 0.7 at 100
    scan = next(c.name for c in cl.grid(p) if c.phase == "scan" and c.row.name == "fzoo" and c.scan_lr == lr)
    results.rows[scan]["curves"] = {"dev": [[0, 0.585], [198, 0.68], [396, 0.7]]}
    fzoo_s0 = results.rows.pop("sst2-fzoo-s0")
    assert reach(never, early, early)["seeds"][0]["interval"] == (100, 198)
    results.rows["sst2-fzoo-s0"] = fzoo_s0
    assert reach(early, early, never)["verdict"] == "inconclusive (between two evaluations)"  # mean in (50, inf]
    for s in (0, 1, 2):
        results.rows[f"sst2-fzoo-s{s}"] |= {"lr": lr, "curves": {"dev": [[0, 0.585], [200, 0.7], [400, 0.7]]}}
    x = reach(early, early, never)  # s2 reaches in (100, 200]: mean in (50, 100]
    assert x["seeds"][2]["interval"] == (100, 200) and x["mean"] == (50, 100) and x["verdict"] == "holds"
    assert reach(late, late, never)["verdict"] == "does not hold at this scale"  # mean in (100, 200]
    # a run whose steps end short of the budget (9 forwards a step: 99 of 100): not reached there is not reached by
    # 100 either, so (100, 198] and not (99, 198]
    short = [[0, 0.585], [99, 0.66]]
    results.reach["sst2-fzoo-s0-first100"] |= {"dev": short, "forwards": 99}
    x = cl.reach_summary(p, results, "fzoo")
    assert x["seeds"][0]["interval"] == (100, 200) and x["verdict"] == "does not hold at this scale"
    # a run at an lr that is no longer the pick does not count
    reach(early, early, early)
    results.reach["sst2-fzoo-s1-first100"]["lr"] = lr * 2
    x = cl.reach_summary(p, results, "fzoo")
    assert "verdict" not in x and x["missing"] == [f"s1: ran at {lr * 2:g}, pick now {lr:g}"]
    assert cl.reach_summary(p, results, "nspsa4") is None
