"""The update log detects an edited line and a dropped one, and replay recomputes every logged projected gradient
from its losses (each estimator's formula) before trusting it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_batch, tiny_model

from zotune.core import UpdateLog, replay
from zotune.core.log import UpdateRecord
from zotune.core.optimizer import check_log_grads
from zotune.methods import METHODS


def trained(method: str = "mezo", steps: int = 4, **cfg):
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    opt = METHODS[method].build(model, METHODS[method].config_cls(**({"lr": 1e-2, "eps": 1e-2} | cfg)))
    if hasattr(opt.estimator, "anchor"):
        opt.estimator.anchor = lambda: model(**tiny_batch(9)).loss
    for t in range(steps):
        opt.step(lambda t=t: model(**tiny_batch(t)).loss)
    return model, base, opt


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def edit(path: Path, line: int, change) -> None:
    """Apply ``change`` to the JSON object on 1-based ``line`` of ``path``, leaving the rest as written."""
    lines = path.read_text().splitlines()
    obj = json.loads(lines[line - 1])
    change(obj)
    lines[line - 1] = json.dumps(obj)
    path.write_text("\n".join(lines) + "\n")


def bump_loss(obj):
    obj["losses"][0] += 0.01


def test_an_edited_loss_names_its_line(tmp_path):
    _, _, opt = trained()
    path = opt.update_log.save(tmp_path / "updates.jsonl")
    edit(path, 4, bump_loss)  # the record of step 2
    with pytest.raises(ValueError, match=r"updates\.jsonl: line 4 \(step 2\) does not match its checksum"):
        UpdateLog.load(path)


def test_a_dropped_last_line_is_a_truncated_log(tmp_path):
    _, _, opt = trained()
    path = opt.update_log.save(tmp_path / "updates.jsonl")
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"the header says 4 record\(s\) but 3 follow .*truncated"):
        UpdateLog.load(path)
    path.write_text("\n".join(path.read_text().splitlines()[:1]) + "\n")  # every record gone
    with pytest.raises(ValueError, match="truncated"):
        UpdateLog.load(path)


def test_a_consistent_edit_of_loss_and_gradient_is_still_caught(tmp_path):
    model, base, opt = trained()
    path = opt.update_log.save(tmp_path / "updates.jsonl")
    eps = opt.param_groups[0]["eps"]

    def both(obj):
        obj["losses"][0] += 0.01
        obj["grads"] = [(obj["losses"][0] - obj["losses"][1]) / (2 * eps)]

    edit(path, 3, both)
    with pytest.raises(ValueError, match=r"line 3 \(step 1\) does not match its checksum"):
        replay(base, path)


def as_legacy(log: UpdateLog, path: Path) -> Path:
    """The log as the format without integrity fields wrote it (a run folder from before)."""
    head = {"format": "zotune-update-log/1", **log.header}
    lines = [json.dumps(head)] + [json.dumps(r.__dict__) for r in log.records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_legacy_log_still_replays_and_its_edited_loss_is_refused_before_any_weight_moves(tmp_path):
    model, base, opt = trained()
    path = as_legacy(opt.update_log, tmp_path / "old.jsonl")
    fresh = copy.deepcopy(base)
    assert replay(fresh, path) == 4
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    edit(path, 3, bump_loss)
    before = params(base)
    with pytest.raises(ValueError, match=r"step 1 \(line 3\): the logged projected gradient .* is not the one"):
        replay(base, path)
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())  # nothing moved


@pytest.mark.parametrize("method", ["mezo", "nspsa", "zo_one_sided", "lozo", "zo_adam"])
def test_every_estimator_formula_recomputes_the_logged_gradients(method):
    extra = {"num_directions": 2} if method in ("nspsa", "zo_one_sided") else {}
    _, base, opt = trained(method, **extra)
    check_log_grads(opt.update_log)  # the honest log passes
    log = UpdateLog(opt.update_log.header, [copy.deepcopy(r) for r in opt.update_log.records])
    log.records[2].losses[-1] += 1e-3
    with pytest.raises(ValueError, match=r"step 2 \(line 4\): the logged projected gradient"):
        check_log_grads(log)
    log.records[2].losses.pop()
    with pytest.raises(ValueError, match=r"step 2 \(line 4\): \d+ losses for \d+ [a-z-]+ direction"):
        replay(base, log)


def test_svrg_gradients_are_recomputed_during_replay():
    """MeZO-SVRG's g depends on its anchor: replay checks each step's g against the estimator's own."""
    model, base, opt = trained("mezo_svrg", steps=5, q=2)
    assert replay(copy.deepcopy(base), opt.update_log) == 5
    log = UpdateLog(opt.update_log.header, [copy.deepcopy(r) for r in opt.update_log.records])
    log.records[3].losses[0] += 1e-3
    with pytest.raises(ValueError, match=r"step 3: the logged projected gradient .* edited or damaged"):
        replay(base, log)


def test_the_integrity_fields_round_trip_and_stay_out_of_the_header():
    log = UpdateLog({"method": "mezo", "seed": 1}, [UpdateRecord(0, [5], [0.5], [1e-3], [1.0, 0.999])])
    lines = log.to_lines()
    head = json.loads(lines[0])
    assert head["format"] == "zotune-update-log/2" and head["records"] == 1 and len(head["chain"]) == 16
    back = UpdateLog.from_lines(lines)
    assert back.header == {"method": "mezo", "seed": 1} and back.records == log.records
    assert back.to_lines() == lines  # a loaded log saves to the same bytes


def test_zotune_replay_of_an_edited_run_log_is_one_line(tmp_path, capsys, workdir):
    from zotune.cli import main as cli
    from zotune.train import run_config_from_dict, train

    run = tmp_path / "run"
    cfg = {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "progress": False, "test": False},
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "out": str(run),
    }
    train(run_config_from_dict(cfg))
    edit(run / "updates.jsonl", 2, bump_loss)
    assert cli(["replay", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "line 2 (step 0) does not match its checksum" in err
    assert not (tmp_path / "out").exists()
