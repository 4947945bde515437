"""Data for training and evaluation: readers for the users' formats, the four tasks, and encoding.

from softtool.data import load_split, default_dev_split, get_task, encode_example
task = get_task("translation", src="en", tgt="de")
split = load_split("../shared/data/multi30k", "val", task=task, limit=200)
enc = encode_example(tokenizer, task.default_template(20), task, split.examples[0], max_length=256)
"""

from softtool.data import hub  # noqa: F401  (registers Hugging Face dataset names as a data source)
from softtool.data.encode import Encoded, encode_example
from softtool.data.example import Example, Split
from softtool.data.options import DataOptions
from softtool.data.readers import default_dev_split, list_splits, load_split
from softtool.data.tasks import TASK_NAMES, Task, TranslationOptions, get_task

__all__ = [
    "TASK_NAMES",
    "DataOptions",
    "Encoded",
    "Example",
    "Split",
    "Task",
    "TranslationOptions",
    "default_dev_split",
    "encode_example",
    "get_task",
    "list_splits",
    "load_split",
]
