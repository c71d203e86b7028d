"""zotune's warm-up schedules give exactly transformers' learning rates, without importing transformers' optimizers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zotune.train.schedule import build_scheduler


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "steps"), [(0, 7), (3, 10), (5, 5)])
def test_same_learning_rates_as_transformers(schedule, warmup, steps):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[schedule]
    ours_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5)
    theirs_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5)
    ours = build_scheduler(schedule, ours_opt, warmup_steps=warmup, steps=steps)
    theirs = get_scheduler(name, theirs_opt, num_warmup_steps=warmup, num_training_steps=steps)
    for _ in range(steps + 2):
        assert ours.get_last_lr() == theirs.get_last_lr()  # exactly: the same float operations
        ours_opt.step(), theirs_opt.step(), ours.step(), theirs.step()
    # a scheduler state saved by either one resumes the other
    fresh = build_scheduler(schedule, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5),
                            warmup_steps=warmup, steps=steps)  # fmt: skip
    fresh.load_state_dict(theirs.state_dict())
    assert fresh.get_last_lr() == theirs.get_last_lr()


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        build_scheduler("step", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup_steps=0, steps=1)


def test_importing_it_pulls_in_neither_peft_nor_bitsandbytes():
    code = "import sys, zotune.train.schedule; print(sorted({'peft', 'bitsandbytes'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_bitsandbytes_kernel_lookup_warning_is_dropped_and_nothing_else():
    code = (
        "import logging, zotune\n"
        "logging.basicConfig(format='%(message)s')\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...', 'x')\n"
        "logging.getLogger('kernels._internals.hf_hub').warning(\"Skipping publisher trust check for "
        "'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode.\")\n"
        "log.warning('another bitsandbytes warning')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.strip() == "another bitsandbytes warning"
