"""Task registry, templates, local loading, user-defined tasks and sampling protocols, on tiny files in tmp_path."""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import replace

import pytest
import torch

from zotune.tasks.base import Example
from zotune.tasks.custom import task_from_config
from zotune.tasks.local import DataNotFoundError
from zotune.tasks.registry import TASKS, get_task, load_split, local_splits, register_task, task_names
from zotune.tasks.sampling import KSHOT_SEEDS, kshot_splits, mezo_splits

# ------------------------------------------------------------------------------------------------ fixtures


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A tiny data folder in the shared/data layout."""
    root = tmp_path / "data"
    sst = root / "glue" / "SST-2"
    sst.mkdir(parents=True)
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"film {i} \t{i % 2}\n" for i in range(40)))
    (sst / "dev.tsv").write_text("sentence\tlabel\na gorgeous film \t1\nbad\t0\n")
    rte = root / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "train.tsv").write_text("sentence1\tsentence2\tlabel\tidx\nA cat sat.\tA cat\t0\t0\nIt rains.\tDry\t1\t1\n")
    (rte / "dev.tsv").write_text("sentence1\tsentence2\tlabel\tidx\nA cat sat.\tA cat\t0\t0\n")
    sg = root / "superglue"
    for split, n in (("train", 6), ("dev32", 3), ("val", 5)):
        _jsonl(
            sg / "CB" / f"{split}.jsonl",
            [
                {
                    "premise": f"P{i}.",
                    "hypothesis": f"h{i}",
                    "label": ["entailment", "contradiction", "neutral"][i % 3],
                }
                for i in range(n)
            ],
        )
    copa = {"premise": "My body cast a shadow.", "choice1": "The sun was rising.", "choice2": "I grew.", "label": 0}
    _jsonl(sg / "COPA" / "train.jsonl", [copa | {"question": "cause"}, copa | {"question": "effect", "label": 1}])
    _jsonl(sg / "COPA" / "dev32.jsonl", [copa | {"question": "cause"}])
    _jsonl(sg / "COPA" / "val.jsonl", [copa | {"question": "cause"}])
    boolq = {"question": "is it true", "passage": "It is.", "label": True}
    _jsonl(sg / "BoolQ" / "train.jsonl", [boolq, boolq | {"question": "Is it false?", "label": False}])
    _jsonl(
        sg / "WSC" / "train.jsonl",
        [{"text": "Tina said it.", "target": {"span1_text": "Tina", "span2_text": "It"}, "label": True}],
    )
    _jsonl(
        sg / "WiC" / "train.jsonl",
        [{"word": "feel", "sentence1": "I feel.", "sentence2": "She felt.", "label": False}],
    )
    multirc = {
        "idx": 0,
        "passage": {
            "text": "Para.",
            "questions": [
                {"question": "Q1?", "answers": [{"text": "a", "label": 1}, {"text": "b", "label": 0}]},
                {"question": "Q2?", "answers": [{"text": "c", "label": 0}]},
            ],
        },
    }
    _jsonl(sg / "MultiRC" / "train.jsonl", [multirc])
    text = "Chelsea beat Olimpija.\n@highlight\nChelsea won"
    record = {
        "passage": {
            "text": text,
            "entities": [{"start": 0, "end": 6}, {"start": 13, "end": 20}, {"start": 34, "end": 40}],
        },
        "qas": [{"query": "@placeholder lost.", "answers": [{"start": 13, "end": 20, "text": "Olimpija"}]}],
    }
    _jsonl(sg / "ReCoRD" / "train.jsonl", [record])
    lm = root / "lm-bff"
    lm.mkdir()
    (lm / "stsa.fine.train").write_text("".join(f"{i % 5} sentence {i}\n" for i in range(100)))
    (lm / "stsa.fine.test").write_text("".join(f"{i % 5} test {i}\n" for i in range(30)))
    (lm / "TREC.train.all").write_text("0 How did serfdom develop ?\n5 How many ?\n")
    monkeypatch.setenv("ZOTUNE_DATA", str(root))
    return root


# ------------------------------------------------------------------------------------------------ templates


def test_registry_names():
    for name in ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"):
        assert name in TASKS
    for name in ("sst5", "trec", "mr", "cr", "mpqa", "subj"):
        assert name in TASKS
    assert get_task("SST-2") is get_task("sst2")
    assert get_task("wsc.fixed").name == "wsc"
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: .*sst2"):
        get_task("nope")


def test_sst2_template_and_calibration(data):
    ex = load_split("sst2", "validation")[0]
    assert ex.prompt == "a gorgeous film It was"
    assert ex.candidates == [" terrible", " great"] and ex.label == 1 and ex.gold == " great"
    assert ex.meta["file"].endswith("glue/SST-2/dev.tsv") and ex.meta["line"] == 2
    assert ex.meta["sentence"] == ex.meta["text"] == "a gorgeous film" and ex.meta["label"] == "1"
    task = get_task("sst2")
    assert task.verbalizer == [" terrible", " great"] and task.calibration_prompt == "N/A It was"
    # GLUE calls its validation set "dev": the same file, no other examples
    assert load_split("sst2", "dev") == load_split("sst2", "validation")
    with pytest.raises(ValueError, match=r"no 'test' split .*available: train, dev, validation"):
        load_split("sst2", "test")


def test_rte_glue_labels_and_template(data):
    a, b = load_split("rte", "train")
    assert a.prompt + a.candidates[a.label] == 'A cat sat.\nDoes this mean that "A cat" is true? Yes or No?\nYes'
    assert b.label == 1 and b.gold == "No"
    assert (b.meta["premise"], b.meta["hypothesis"], b.meta["sentence1"]) == ("It rains.", "Dry", "It rains.")
    assert get_task("rte").calibration_prompt == 'N/A\nDoes this mean that "N/A" is true? Yes or No?\n'
    # SuperGLUE strings
    ex = get_task("rte").to_example({"premise": "p", "hypothesis": "h", "label": "not_entailment"})
    assert ex.label == 1


def test_cb_boolq_wsc_wic_multirc(data):
    cb = load_split("cb", "train")
    assert cb[0].prompt == 'Suppose P0. Can we infer that "h0"? Yes, No, or Maybe?\n'
    assert cb[0].candidates == ["Yes", "No", "Maybe"] and [e.label for e in cb[:3]] == [0, 1, 2]
    yes, no = load_split("boolq", "train")
    assert yes.prompt == "It is. Is it true?\n" and yes.gold == "Yes"
    assert no.prompt == "It is. Is it false?\n" and no.gold == "No"
    (wsc,) = load_split("wsc", "train")
    assert wsc.prompt == 'Tina said it.\nIn the previous sentence, does the pronoun "it" refer to Tina? Yes or No?\n'
    assert wsc.gold == "Yes"
    (wic,) = load_split("wic", "train")
    assert (
        wic.prompt
        == 'Does the word "feel" have the same meaning in these two sentences? Yes, No?\nI feel.\nShe felt.\n'
    )
    assert wic.gold == "No"
    rc = load_split("multirc", "train")
    assert len(rc) == 3  # one example per answer
    assert rc[0].prompt == 'Para.\nQuestion: Q1?\nI found this answer "a". Is that correct? Yes or No?\n'
    assert [e.gold for e in rc] == ["Yes", "No", "No"]
    assert [(e.meta["line"], e.meta["question_index"], e.meta["answer_index"]) for e in rc] == [
        (1, 0, 0),
        (1, 0, 1),
        (1, 1, 0),
    ]


def test_copa_and_record_candidates(data):
    cause, effect = load_split("copa", "train")
    assert cause.kind == "multiple_choice"
    assert cause.prompt == "My body cast a shadow because"
    assert cause.candidates == [" the sun was rising.", " I grew."] and cause.label == 0
    assert effect.prompt == "My body cast a shadow so" and effect.label == 1
    (rec,) = load_split("record", "train")
    assert rec.kind == "multiple_choice"
    assert rec.prompt == "Chelsea beat Olimpija.\n- Chelsea won\n-"
    assert rec.candidates == [" Chelsea lost.", " Olimpija lost."]  # "Chelsea" twice: deduplicated, sorted
    assert rec.label == 1 and rec.meta["answers"] == ["Olimpija"] and rec.meta["entities"] == ["Chelsea", "Olimpija"]
    many = get_task("record").to_example(
        {"passage": "x", "query": "@placeholder y", "entities": ["A", "B", "C"], "answers": ["C", "B"]}
    )
    assert many.label == 2 and many.meta["answers"] == ["C", "B"]  # first gold answer, all kept


def test_generation_templates():
    squad = get_task("squad").to_example(
        {"title": "T", "context": "C.", "question": " Who? ", "answers": {"text": ["Bob", "Bob B"]}}
    )
    assert squad.kind == "generation" and squad.prompt == "Title: T\nContext: C.\nQuestion: Who?\nAnswer:"
    assert squad.answers == [" Bob", " Bob B"] and squad.demonstration() == squad.prompt + " Bob"
    drop = get_task("drop").to_example({"passage": "P.", "question": "How many?", "answers_spans": {"spans": ["3"]}})
    assert drop.prompt == "Passage: P.\nQuestion: How many?\nAnswer:" and drop.answers == [" 3"]
    assert get_task("squad").metric == "f1" and get_task("drop").metric == "f1"


def test_lmbff_tasks(data):
    sst5 = load_split("sst5", "train")
    assert len(sst5) == 100 and sst5[3].prompt == "sentence 3 It was" and sst5[3].gold == " good"
    assert get_task("sst5").verbalizer == [" terrible", " bad", " okay", " good", " great"]
    trec = load_split("trec", "train")
    assert trec[0].prompt == "Question: How did serfdom develop ?\nAnswer type:" and trec[1].gold == " Number"
    assert local_splits("trec") == ["train"] and local_splits("sst5") == ["train", "test"]
    mr = tmp = data / "mine.txt"
    tmp.write_text("1 a fine film\n")
    assert load_split("mr", "train", path=mr)[0].gold == " great"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_builtin_rows(data, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nok\t1\nfine\t7\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: field 'label': label '7' is not one of the allowed labels"):
        load_split("sst2", "train", path=bad)
    nolabel = tmp_path / "cb.jsonl"
    _jsonl(nolabel, [{"premise": "p"}])
    with pytest.raises(ValueError, match=r"cb.jsonl:1: missing field 'hypothesis' \(fields: premise\)"):
        load_split("cb", "train", path=nolabel)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"premise": "p"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_split("cb", "train", path=broken)
    with pytest.raises(DataNotFoundError, match="missing data file .*nope.tsv"):
        load_split("sst2", "train", path=tmp_path / "nope.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"empty.tsv: no examples \(empty split\)"):
        load_split("sst2", "train", path=empty)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_split("sst2", "val")


def test_hub_fallback_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataNotFoundError, match="pip install datasets") as err:
        load_split("squad", "validation")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ user tasks


def _csv(path, text):
    path.write_text(text)
    return str(path)


def test_user_classification_task(tmp_path, monkeypatch):
    import zotune.tasks.registry as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registering here leaks to no other test
    train = _csv(tmp_path / "train.csv", 'review,stars\n"lovely, really",pos\nawful,neg\n')
    cfg = {
        "name": "reviews",
        "files": {"train": train},
        "columns": {"text": "review", "label": "stars"},
        "template": "{review} It was",
        "verbalizer": {"neg": " terrible", "pos": " great"},
    }
    task = task_from_config(cfg)
    a, b = load_split(task, "train")
    assert a.prompt == "lovely, really It was" and a.candidates == [" terrible", " great"] and a.label == 1
    assert b.label == 0 and b.meta["line"] == 3 and task.calibration_prompt == "N/A It was"
    assert register_task(task) is get_task("reviews") and "reviews" in task_names()
    with pytest.raises(ValueError, match="already registered"):
        register_task(task)
    with pytest.raises(ValueError, match=r"no 'test' split \(its files: train\)"):
        load_split(task, "test")
    # JSON lines with integer labels, default template "{text}"
    jl = tmp_path / "t.jsonl"
    _jsonl(jl, [{"text": "x", "label": 1}])
    t2 = task_from_config({"path": str(jl), "verbalizer": {0: " no", 1: " yes"}})
    assert load_split(t2, "train")[0].gold == " yes"


def test_user_task_errors(tmp_path):
    good = {"verbalizer": {"0": " no", "1": " yes"}}
    with pytest.raises(DataNotFoundError, match=r"train file .*missing.csv does not exist"):
        task_from_config(good | {"path": str(tmp_path / "missing.csv")})
    f = _csv(tmp_path / "a.csv", "text,label\nfine,1\nodd,2\n")
    with pytest.raises(
        ValueError, match=r"a.csv:3: column 'label': label '2' is not in the verbalizer \(allowed: '0', '1'\)"
    ):
        load_split(task_from_config(good | {"path": f}), "train")
    f = _csv(tmp_path / "b.csv", "text,y\nfine,1\n")
    with pytest.raises(ValueError, match=r"b.csv:2: missing label column 'label' \(columns: text, y\)"):
        load_split(task_from_config(good | {"path": f}), "train")
    f = _csv(tmp_path / "c.csv", "text,label\nfine,1\n")
    with pytest.raises(
        ValueError, match=r"c.csv:2: template field \{sentence\} is not a column .*columns: label, text"
    ):
        load_split(task_from_config(good | {"path": f, "template": "{sentence} It was"}), "train")
    f = _csv(tmp_path / "d.csv", "text,label\n")
    with pytest.raises(ValueError, match=r"d.csv: no examples \(empty split\)"):
        load_split(task_from_config(good | {"path": f}), "train")
    with pytest.raises(ValueError, match="needs 'verbalizer'"):
        task_from_config({"kind": "classification", "path": f})
    with pytest.raises(ValueError, match="unknown keys"):
        task_from_config(good | {"path": f, "verbaliser": {}})
    for err in (ValueError, DataNotFoundError):
        assert issubclass(DataNotFoundError, FileNotFoundError) and err


def test_user_generation_and_multiple_choice(tmp_path):
    g = tmp_path / "g.jsonl"
    _jsonl(g, [{"q": "2+2=", "a": " 4"}])
    task = task_from_config({"path": str(g), "columns": {"prompt": "q", "completion": "a"}})
    (ex,) = load_split(task, "train")
    assert task.kind == "generation" and ex.prompt == "2+2=" and ex.answers == [" 4"] and task.metric == "f1"
    with pytest.raises(ValueError, match=r"g.jsonl:1: missing completion column 'answer'"):
        load_split(task_from_config({"path": str(g), "columns": {"prompt": "q", "completion": "answer"}}), "train")
    m = _csv(
        tmp_path / "m.csv", 'question,options,gold\nSky is,"["" blue"", "" green""]",0\nGrass is,"["" blue""]",0\n'
    )
    cfg = {"path": m, "kind": "multiple_choice", "columns": {"candidates": "options", "label": "gold"}}
    cfg["template"] = "{question}"
    mc = task_from_config(cfg)
    with pytest.raises(ValueError, match=r"m.csv:3: column 'options': expected a list of at least 2"):
        load_split(mc, "train")
    _csv(tmp_path / "m.csv", 'question,options,gold\nSky is,"["" blue"", "" green""]",5\n')
    with pytest.raises(
        ValueError, match=r"m.csv:2: column 'gold': label '5' is not a candidate index \(allowed: 0..1\)"
    ):
        load_split(mc, "train")
    _csv(tmp_path / "m.csv", 'question,options,gold\nSky is,"["" blue"", "" green""]",0\n')
    (ex,) = load_split(mc, "train")
    assert ex.kind == "multiple_choice" and ex.prompt == "Sky is" and ex.candidates == [" blue", " green"]


# ------------------------------------------------------------------------------------------------ sampling


def _sizes(splits):
    return {k: len(v) for k, v in splits.items()}


def test_mezo_splits_sizes_determinism_and_global_rng(data):
    s = mezo_splits("sst2", seed=0, n_train=20, n_dev=10, n_test=1)
    assert _sizes(s) == {"train": 20, "dev": 10, "test": 1}
    assert s.protocol.startswith("mezo (seed=0): train 20 + dev 10 drawn from train (40)")
    train_ids = {e.meta["line"] for e in s["train"]}
    assert not train_ids & {e.meta["line"] for e in s["dev"]}
    random.seed(123)
    torch.manual_seed(123)
    state = (random.getstate(), torch.get_rng_state())
    again = mezo_splits("sst2", seed=0, n_train=20, n_dev=10, n_test=1)
    assert again == s
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    random.seed(999)
    torch.manual_seed(999)
    assert mezo_splits("sst2", seed=0, n_train=20, n_dev=10, n_test=1) == s
    assert mezo_splits("sst2", seed=1, n_train=20, n_dev=10, n_test=1)["train"] != s["train"]


def test_mezo_shrinks_and_fewglue(data):
    with pytest.warns(UserWarning, match="mezo-shrunk"):
        s = mezo_splits("sst2", seed=0, n_train=35, n_dev=10)
    assert _sizes(s) == {"train": 30, "dev": 10, "test": 2}
    with pytest.warns(UserWarning, match="FewGLUE"):
        s = mezo_splits("cb", seed=0)
    assert _sizes(s) == {"train": 6, "dev": 3, "test": 5} and s.protocol.startswith("fewglue (seed=0)")
    assert "1000/100/1000" in s.protocol  # CB uses dev=100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _sizes(mezo_splits("rte", n_train=1, n_dev=1)) == {"train": 1, "dev": 1, "test": 1}


def test_kshot_balance_and_determinism(data):
    s = kshot_splits("sst5", k=4, seed=13)
    assert _sizes(s) == {"train": 20, "dev": 20, "test": 30}
    for split in ("train", "dev"):
        counts = [sum(e.label == c for e in s[split]) for c in range(5)]
        assert counts == [4] * 5
    assert not {e.meta["line"] for e in s["train"]} & {e.meta["line"] for e in s["dev"]}
    assert kshot_splits("sst5", k=4, seed=13) == s and kshot_splits("sst5", k=4, seed=21) != s
    assert 13 in KSHOT_SEEDS and len(KSHOT_SEEDS) == 5
    assert (
        s.protocol
        == "lm-bff k-shot (k=4 per class, seed=13): train 20 + dev 20 from train (100), test 30 = all of test (30)"
    )
    capped = kshot_splits("sst5", k=1, seed=13, n_test=7)
    assert len(capped["test"]) == 7 and "drawn (seed 0) from test (30)" in capped.protocol
    with pytest.raises(ValueError, match=r"k=11 needs 22 training examples per class"):
        kshot_splits("sst5", k=11, seed=13)
    with pytest.raises(ValueError, match="needs a classification task"):
        kshot_splits("copa", k=1, seed=13)


def test_examples_are_plain_examples(data):
    task = replace(get_task("sst2"))
    assert all(isinstance(e, Example) for e in load_split(task, "train"))


@pytest.mark.parametrize("name", ["readers", "builtin", "registry", "custom", "sampling"])
def test_docstring_examples(name, monkeypatch, tmp_path):
    import doctest
    import importlib

    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no data folder: the examples use their own files
    result = doctest.testmod(importlib.import_module(f"zotune.tasks.{name}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_hub_path_with_a_stub_datasets(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        if repo == "drop":
            raise ConnectionError("Couldn't reach the hub\nsecond line")
        return [{"text": "a fine film", "label": 3, "label_text": "positive"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (ex,) = load_split("sst5", "dev", source="hub")
    assert calls == [("SetFit/sst5", None, "validation")]
    assert ex.prompt == "a fine film It was" and ex.gold == " good"
    assert ex.meta["file"] == "hf:SetFit/sst5:validation" and ex.meta["line"] == 1
    with pytest.raises(
        DataNotFoundError, match=r"could not load drop \[validation\] .*Couldn't reach the hub\)"
    ) as err:
        load_split("drop", "validation")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"no 'validation' split on the hub \(available: train, test\)"):
        load_split("trec", "validation", source="hub")
