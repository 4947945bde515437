"""The one interface every generation backend implements (PyTorch here, ONNX Runtime in onnx_backend).

Inputs are encoded pieces, one token-id list per text slot of the template, exactly what the C++
batch builder takes; the backend places the virtual tokens itself. Outputs are new token ids only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

try:  # the C++ engineer's dataclass is the contract; it lives next to the compiled core
    from softtool.search import SearchOptions
except ImportError:  # softtool._core not built (or not yet written): same fields, same defaults

    @dataclass
    class SearchOptions:  # type: ignore[no-redef]
        """Decoding options (mirrors softtool.search.SearchOptions)."""

        max_new_tokens: int = 64
        min_new_tokens: int = 0
        eos_token_ids: list[int] = field(default_factory=lambda: [2])
        pad_token_id: int = 2
        num_beams: int = 1
        length_penalty: float = 1.0
        early_stopping: bool = False
        repetition_penalty: float = 1.0
        no_repeat_ngram_size: int = 0
        num_return_sequences: int = 1
        do_sample: bool = False
        temperature: float = 1.0
        top_k: int = 0
        top_p: float = 1.0
        seed: int = 0


Rows = list[list[list[int]]]  # batch -> text slots -> token ids


class Generator(ABC):
    """A soft prompt bound to a model, ready to generate."""

    template: object  # softtool.prompts.template.Template
    tokenizer: object
    meta: object  # softtool.adapter.AdapterMeta

    def encode(self, fields) -> list[list[int]]:
        """Token ids of each text slot of the template filled with `fields` (tokenized separately, as in training)."""
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.template.render(fields)]

    @abstractmethod
    def generate(self, rows: Rows, task_ids: list[int] | None, options: SearchOptions) -> list[list[list[int]]]:
        """Per example, `num_return_sequences` lists of new token ids (EOS excluded)."""
