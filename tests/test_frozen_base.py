"""Training touches only the prompt: SmolLM2's weights are bit-identical after a few steps and none
of them receives a gradient."""

from __future__ import annotations

import hashlib

import pytest

from helpers import write_translation_data
from softtool.prompts.encoder import PromptConfig
from softtool.training import DataOptions, TrainOptions, train_prompt


def _digest(model) -> dict[str, str]:
    return {name: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for name, p in model.state_dict().items()}


@pytest.mark.slow
def test_base_weights_are_bit_identical_after_training(tmp_path, smollm2, smollm2_tokenizer):
    data = write_translation_data(
        tmp_path / "data", ["A man rides a bike.", "Two dogs."], ["Ein Mann fährt Rad.", "Zwei Hunde."]
    )
    before = _digest(smollm2)
    summary = train_prompt(
        DataOptions(task="translation", data=str(data), task_options={"src": "en", "tgt": "de"}),
        PromptConfig(num_virtual_tokens=2),
        TrainOptions(
            max_steps=2,
            batch_size=2,
            lr=0.5,
            warmup_steps=0,
            eval_every=0,
            eval_limit=2,
            checkpoint_every=0,
            max_length=32,
            device="cpu",
        ),
        tmp_path / "out",
        model=smollm2,
        tokenizer=smollm2_tokenizer,
        progress=False,
    )
    assert summary.result.state.step == 2
    assert _digest(smollm2) == before
    assert all(p.grad is None and not p.requires_grad for p in smollm2.parameters())
    assert not smollm2.training
