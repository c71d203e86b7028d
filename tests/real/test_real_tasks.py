"""Every task with data in ``shared/data`` loads with the row counts of its README; MeZO and k-shot sampling sizes."""

from __future__ import annotations

import warnings

import pytest
from real_support import require_or_skip

from zotune.tasks.local import DataNotFoundError, find_data_dir
from zotune.tasks.registry import load_split, local_splits
from zotune.tasks.sampling import kshot_splits, mezo_splits

pytestmark = pytest.mark.real

# (task, split) -> rows, from shared/data/README.md (MultiRC: answers; ReCoRD: queries of the 32 passages)
COUNTS = {
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("boolq", "validation"): 3270,
    ("cb", "validation"): 56,
    ("copa", "validation"): 100,
    ("wic", "validation"): 638,
    ("wsc", "validation"): 104,
    ("multirc", "validation"): 4848,
    ("sst5", "train"): 8544,
    ("sst5", "dev"): 1101,
    ("sst5", "test"): 2210,
    ("trec", "train"): 5452,
    ("trec", "test"): 500,
}


@pytest.fixture(scope="module")
def data_dir():
    try:
        return find_data_dir()
    except DataNotFoundError as err:
        reason = str(err)
    require_or_skip(False, reason)


@pytest.mark.parametrize(("task", "split"), sorted(COUNTS))
def test_row_counts(data_dir, task, split):
    examples = load_split(task, split, data_dir=data_dir)
    assert len(examples) == COUNTS[task, split]
    assert all(e.label is not None for e in examples)


@pytest.mark.parametrize("task", ["boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"])
def test_fewglue_files_load(data_dir, task):
    assert {"train", "dev"} <= set(local_splits(task, data_dir))
    train = load_split(task, "train", data_dir=data_dir)
    dev = load_split(task, "dev", data_dir=data_dir)
    assert train and dev and all(e.label is not None for e in train + dev)
    if task not in ("multirc", "record", "rte"):
        assert len(train) == len(dev) == 32


def test_mezo_sst2_and_rte(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough training data: no shrinking
        s = mezo_splits("sst2", seed=0, data_dir=data_dir)
        r = mezo_splits("rte", seed=0, data_dir=data_dir)
    assert {k: len(v) for k, v in s.items()} == {"train": 1000, "dev": 500, "test": 872}
    assert s.protocol.startswith("mezo (seed=0): train 1000 + dev 500 drawn from train (67349), test 872")
    assert {k: len(v) for k, v in r.items()} == {"train": 1000, "dev": 500, "test": 277}


def test_mezo_superglue_uses_fewglue(data_dir):
    with pytest.warns(UserWarning, match="FewGLUE"):
        s = mezo_splits("boolq", seed=0, data_dir=data_dir)
    assert {k: len(v) for k, v in s.items()} == {"train": 32, "dev": 32, "test": 1000}
    assert s.protocol.startswith("fewglue (seed=0)")


def test_kshot_sst5_trec(data_dir):
    s = kshot_splits("sst5", 16, 13, data_dir=data_dir)
    assert {k: len(v) for k, v in s.items()} == {"train": 80, "dev": 80, "test": 1000}
    t = kshot_splits("trec", 16, 42, data_dir=data_dir)
    assert {k: len(v) for k, v in t.items()} == {"train": 96, "dev": 96, "test": 500}
    assert sorted(e.label for e in t["train"]) == sorted(list(range(6)) * 16)
