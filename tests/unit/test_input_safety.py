"""What zotune reads never runs code, and bad input or a bad machine state ends in one line that names the file.

Covers recipes and task files (YAML tags), model folders (pickled weights, a model's own code), mask files, CSV
quirks (long fields, Latin-1, extra cells), flag values (nan, inf, negative numbers), the CLI's error lines (a full
disk, an output under a file), the truncation warning and an outlier row's cost, and misspelt packaged names."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tiny import save_tiny_model, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from zotune.cli import main as cli
from zotune.cli import user_error
from zotune.models import ModelLoadError, load, resolve
from zotune.models.sensitivity import MaskError, SparseMask
from zotune.tasks import Example, scoring
from zotune.tasks.readers import read_rows
from zotune.train import ConfigError
from zotune.train.args import parse_train_args
from zotune.train.data import resolve_task


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("zotune ")]


def yaml_that_runs(marker: Path) -> str:
    return f"!!python/object/apply:os.system ['touch {marker}']\n"


# ------------------------------------------------------------------------------------------------- no code from files


def test_a_recipe_with_a_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: " + yaml_that_runs(marker))
    with pytest.raises(ConfigError, match=r"--config .*r\.yaml: not valid YAML"):
        parse_train_args(["--config", str(recipe)])
    assert not marker.exists()


def test_a_task_file_with_a_python_tag_is_one_line_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    task = tmp_path / "task.yaml"
    task.write_text("name: " + yaml_that_runs(marker))
    with pytest.raises(ConfigError, match=r"data\.task: .*task\.yaml:1: not valid YAML \(could not determine a"):
        resolve_task(str(task))
    assert cli(["train", "--data.task", str(task), "--out", str(tmp_path / "run")]) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "task.yaml:1: not valid YAML" in err[0]
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_an_invalid_task_yaml_names_file_and_line(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("name: x\nfiles: {train: a.csv\ntemplate: '{text}'\n")
    with pytest.raises(ConfigError, match=r"task\.yaml:\d+: not valid YAML"):
        resolve_task(str(task))
    (tmp_path / "task.json").write_text('{"name": "x",\n "files": }')
    with pytest.raises(ConfigError, match=r"task\.json:2: not valid JSON"):
        resolve_task(str(tmp_path / "task.json"))


@pytest.fixture
def model_folder(tmp_path) -> Path:
    return Path(save_tiny_model(tmp_path / "model", ["a tiny corpus of words", "more words here"]))


def test_a_model_folder_with_pickled_objects_runs_nothing(model_folder, tmp_path):
    marker = tmp_path / "ran"
    (model_folder / "model.safetensors").unlink()
    (model_folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": RunsCode(marker)}))
    with pytest.raises(ModelLoadError, match=r"hold Python objects other than tensors, which zotune does not load"):
        load(str(model_folder))
    assert not marker.exists()


def test_a_model_folder_with_its_own_code_is_refused_even_when_the_user_says_yes(model_folder, tmp_path):
    """transformers asks "Do you wish to run the custom code? [y/N]" on the terminal; zotune never lets it ask."""
    marker = tmp_path / "ran"
    cfg = json.loads((model_folder / "config.json").read_text())
    cfg |= {"model_type": "own-code", "auto_map": {"AutoConfig": "own.Cfg", "AutoModelForCausalLM": "own.Model"}}
    (model_folder / "config.json").write_text(json.dumps(cfg))
    (model_folder / "own.py").write_text(
        f"import os\nos.system('touch {marker}')\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
        "class Cfg(LlamaConfig):\n    model_type = 'own-code'\n"
        "class Model(LlamaForCausalLM):\n    config_class = Cfg\n"
    )
    script = f"from zotune.models import load\nload({str(model_folder)!r})\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], input="y\ny\n", capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "needs its own Python code" in out.stderr and "custom code? [y/N]" not in out.stdout
    assert not marker.exists()


def test_a_mask_file_that_is_a_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "m.safetensors"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(MaskError, match="cannot read mask"):
        SparseMask.load(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ CSV quirks


def test_a_csv_field_longer_than_131072_characters_is_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "word " * 40_000 + ",pos\nshort,neg\n")
    rows = read_rows(path, "csv")
    assert len(rows[0]["text"]) == 200_000 and rows[1]["meta"]["line"] == 3
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_latin1_file_names_the_file_the_line_and_the_fix(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    text = "text,label\nok,pos\ncaf\xe9,neg\n" if fmt == "csv" else '{"t": "ok"}\n{"t": "caf\xe9"}\n'
    path.write_bytes(text.encode("latin-1"))
    line = 3 if fmt == "csv" else 2
    with pytest.raises(ValueError, match=rf"data\.{fmt}:{line}: byte 0xe9 is not UTF-8 .*iconv -f latin1 -t utf-8"):
        read_rows(path, fmt)


def test_a_latin1_task_file_and_a_binary_recipe_are_named(tmp_path):
    (tmp_path / "task.yaml").write_bytes("name: x\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"task\.yaml:2: not UTF-8 text"):
        resolve_task(str(tmp_path / "task.yaml"))
    (tmp_path / "r.yaml").write_bytes(b"train:\n  steps: 3\n\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ConfigError, match=r"--config .*r\.yaml: line 3: byte 0x89 is not UTF-8 text"):
        parse_train_args(["--config", str(tmp_path / "r.yaml")])


def test_csv_rows_with_extra_cells_are_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood film,pos\ngood, bad film,neg\n")
    with pytest.raises(ValueError, match=r"d\.csv:3: 3 cells, but the header has 2 columns \(quote a field"):
        read_rows(path, "csv")
    path.write_text('text,label\ngood film,pos\n"good, bad film",neg\n')
    assert read_rows(path, "csv")[1]["text"] == "good, bad film"


# ----------------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_nan_and_inf_flags_say_the_number_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"lr=-?(nan|inf): must be a finite number"):
        parse_train_args(["--mezo.lr", value])
    with pytest.raises(ConfigError, match=r"lr=-?(nan|inf): must be a finite number"):
        parse_train_args([f"--mezo.lr={value}"])


def test_a_negative_number_is_a_flag_value():
    with pytest.raises(ConfigError, match=r"invalid learning rate lr=-1e-05: must be a finite number >= 0"):
        parse_train_args(["--mezo.lr", "-1e-5"])
    cfg = parse_train_args(["--mezo.lr", "2e-5", "--mezo.eps", "1e-3", "--train.steps", "5"])
    assert (cfg.mezo.lr, cfg.mezo.eps, cfg.train.steps) == (2e-5, 1e-3, 5)


def test_a_folder_given_as_config_is_said_to_be_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .* is a folder: give a YAML recipe file"):
        parse_train_args(["--config", str(tmp_path)])


# --------------------------------------------------------------------------------------------- CLI one-line errors


def test_a_full_disk_and_a_truncated_safetensors_file_are_one_line(tmp_path):
    # safetensors' message when the disk fills during a save (its writer's io::Error, as the run met it)
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    message = user_error(full)
    assert message is not None and "no space left" in message.lower() and "\n" not in message
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4096)}, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SafetensorError) as info:
        load_file(str(path))
    assert user_error(info.value).startswith("a safetensors file is damaged or incomplete")
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/a/metrics.jsonl")  # as open().write raises it
    assert user_error(enospc).startswith("No space left on device: runs/a/metrics.jsonl (free some space")
    assert user_error(KeyError("a bug")) is None  # a bug keeps its traceback


def test_replay_out_a_file_is_one_line_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    start = time.perf_counter()
    assert cli(["replay", "--base", "does/not-matter", "--log", "x.jsonl", "--out", str(tmp_path / "out")]) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "is a file, not a folder" in err[0] and time.perf_counter() - start < 5


def test_train_out_under_a_file_is_one_line(workdir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    args = ["train", "--model.name", str(workdir / "model"), "--data.task", str(workdir / "reviews.yaml")]
    assert cli([*args, "--data.protocol", "files", "--out", str(tmp_path / "f" / "run")]) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and str(tmp_path / "f") in err[0]


# ------------------------------------------------------------------------------------------------- long prompts


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer(["the film was good", "the film was bad", "It was good", "It was bad"] * 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)  # fmt: skip
        model = LlamaForCausalLM(cfg).eval()
    return model, tok


def test_the_truncation_warning_says_the_length_and_the_key(lm, caplog):
    model, tok = lm
    exs = [Example("the film was good " * 200 + "It was", [" bad", " good"], label=1)]
    with caplog.at_level(logging.WARNING, logger="zotune.tasks.scoring"):
        scoring.classification_loss(model, tok, exs, max_length=64)
    assert "cut from the left to max_length=64 tokens" in caplog.text and "data.max_length" in caplog.text


def test_an_outlier_row_runs_alone_instead_of_padding_the_batch(lm):
    """One prompt of thousands of tokens in a batch of short ones: the short rows are not padded to its length."""
    model, tok = lm
    exs = [
        Example(f"the film was {'good' if i % 2 else 'bad'} It was", [" bad", " good"], label=i % 2) for i in range(8)
    ]
    exs.append(Example("the film was good " * 2000 + "It was", [" bad", " good"], label=1))
    stats: dict = {}
    with torch.no_grad():
        loss = scoring.classification_loss(model, tok, exs, max_length=2048, stats=stats)
        alone = [scoring.classification_loss(model, tok, [ex], max_length=2048) for ex in exs]
    assert stats["n_forward"] == 2 and stats["n_tokens"] < 2048 + 8 * 20  # not 9 × 2048
    assert float(loss) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-5)
    short: dict = {}
    with torch.no_grad():
        scoring.classification_loss(model, tok, exs[:8], stats=short)
    assert short["n_forward"] == 1  # ordinary batches run as one forward, as before


# --------------------------------------------------------------------------------------------------- model names


def test_a_misspelt_packaged_name_is_answered_at_once():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"'smollm3-135m' is not a packaged model .*did you mean 'smollm2-135m'"):
        load("smollm3-135m")
    assert time.perf_counter() - start < 2
    assert resolve("HuggingFaceTB/SmolLM3-135M").source == "hub"  # an owner/name id still goes to the hub
    assert resolve("gpt2").source == "hub"  # and so does a bare hub id that is not close to a packaged name
