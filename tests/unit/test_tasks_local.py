"""Locating and reading the local benchmark data."""

from __future__ import annotations

import pytest

from zotune.tasks import DataNotFoundError, find_data_dir, read_sst2


def test_explicit_data_dir_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="no glue/"):
        find_data_dir(tmp_path / "nope")
    monkeypatch.setenv("ZOTUNE_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataNotFoundError, match=r"\$ZOTUNE_DATA"):
        find_data_dir()


def test_read_sst2_from_a_folder(tmp_path, monkeypatch):
    d = tmp_path / "glue" / "SST-2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text('sentence\tlabel\na "quoted" film \t1\nbad\t0\nok\t1\n')
    monkeypatch.setenv("ZOTUNE_DATA", str(tmp_path))
    assert read_sst2("train") == [
        {"sentence": 'a "quoted" film', "label": 1},
        {"sentence": "bad", "label": 0},
        {"sentence": "ok", "label": 1},
    ]
    assert len(read_sst2("train", limit=2)) == 2
    with pytest.raises(DataNotFoundError, match="dev.tsv"):
        read_sst2("dev")
    with pytest.raises(ValueError, match="split"):
        read_sst2("test")
