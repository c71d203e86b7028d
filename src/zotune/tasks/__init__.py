"""Tasks and evaluation: the benchmark suite of the ZO papers on real data, and the scorer that evaluates them.

A :class:`~zotune.tasks.base.Task` turns rows (local files or the Hugging Face hub) into
:class:`~zotune.tasks.base.Example` objects (prompt, candidates or answers, gold label); the scorer evaluates any
example the same way (length-normalized candidate log-likelihood, optional calibration, greedy generation with
SQuAD F1/EM, a classification-head path for encoders), zero-shot or with in-context demonstrations.

Example:
    >>> from zotune.tasks import get_task
    >>> get_task("sst2").verbalizer
    [' terrible', ' great']
"""

from .base import Example, Task
from .custom import task_from_config
from .evaluate import accuracy_objective, bench_scoring, evaluate, f1_objective
from .icl import build_icl_prompt, sample_demos
from .local import DataNotFoundError, find_data_dir, read_sst2
from .registry import SPLITS, TASKS, get_task, load_split, local_splits, register_task, task_names
from .sampling import KSHOT_SEEDS, Splits, kshot_splits, mezo_splits
from .scoring import (
    answer_lm_loss,
    classification_loss,
    exact_match,
    f1_score,
    generate_answers,
    head_loss,
    model_max_length,
    normalize_answer,
    score_candidates,
    score_with_head,
)

__all__ = [
    "KSHOT_SEEDS",
    "SPLITS",
    "TASKS",
    "DataNotFoundError",
    "Example",
    "Splits",
    "Task",
    "accuracy_objective",
    "answer_lm_loss",
    "bench_scoring",
    "build_icl_prompt",
    "classification_loss",
    "evaluate",
    "exact_match",
    "f1_objective",
    "f1_score",
    "find_data_dir",
    "generate_answers",
    "get_task",
    "head_loss",
    "kshot_splits",
    "load_split",
    "local_splits",
    "mezo_splits",
    "model_max_length",
    "normalize_answer",
    "read_sst2",
    "register_task",
    "sample_demos",
    "score_candidates",
    "score_with_head",
    "task_from_config",
    "task_names",
]
