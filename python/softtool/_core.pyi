"""Type stubs of softtool._core, the C++ decoding core (see softtool.search for the protocol)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class BatchOptions:
    vocab_size: int
    num_virtual_tokens: int
    padding_side: str  # "left" or "right"
    pad_id: int
    num_tasks: int
    def __init__(self) -> None: ...
    def validate(self) -> None: ...

class SearchOptions:
    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str  # True, False or "never"
    repetition_penalty: float
    no_repeat_ngram_size: int
    num_return_sequences: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_threads: int
    def __init__(self) -> None: ...
    def validate(self) -> None: ...

class Batch:
    input_ids: npt.NDArray[np.int64]
    attention_mask: npt.NDArray[np.int64]
    position_ids: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    def __getitem__(self, key: str) -> npt.NDArray[np.int64]: ...
    def keys(self) -> tuple[str, ...]: ...
    def as_dict(self) -> dict[str, npt.NDArray[np.int64]]: ...

def build_batch(
    rows: Sequence[Sequence[Any]], task_ids: Any, layout: Sequence[tuple[str, int]], options: BatchOptions
) -> Batch: ...

class Hypothesis:
    @property
    def tokens(self) -> npt.NDArray[np.int64]: ...
    @property
    def score(self) -> float: ...

class StepResult:
    next_tokens: npt.NDArray[np.int64]
    beam_indices: npt.NDArray[np.int64]
    finished: npt.NDArray[np.bool_]

class SearchStrategy:
    def start(self, prompt_ids: Sequence[Any], left_padding: Sequence[int] = ...) -> None: ...
    def step(self, logits: npt.ArrayLike) -> StepResult: ...
    def step_topk(self, values: npt.ArrayLike, indices: npt.ArrayLike) -> StepResult: ...
    def is_done(self) -> bool: ...
    def finalize(self) -> list[list[Hypothesis]]: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def batch_size(self) -> int: ...

class GreedySearch(SearchStrategy):
    def __init__(self, options: SearchOptions) -> None: ...

class BeamSearch(SearchStrategy):
    def __init__(self, options: SearchOptions) -> None: ...

def make_search(options: SearchOptions) -> SearchStrategy: ...
