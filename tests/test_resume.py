"""Checkpoints: a run stopped by SIGINT saves a usable checkpoint and adapter, and --resume continues
to exactly the prompt an uninterrupted run with the same seed reaches."""

from __future__ import annotations

import signal

import pytest
import torch

from softtool.adapter import load_adapter
from softtool.errors import SofttoolError
from softtool.prompts.encoder import PromptConfig
from softtool.runtime.torch_backend import TorchGenerator
from softtool.search import SearchOptions
from softtool.training import DataOptions, TrainOptions, train_prompt
from softtool.training.checkpoint import load_checkpoint
from softtool.training.loop import Trainer

SOURCES = ["A man rides a bike.", "Two dogs play.", "A girl reads.", "The cat sleeps.", "People walk.", "A boy runs."]
TARGETS = [
    "Ein Mann fährt Rad.",
    "Zwei Hunde spielen.",
    "Ein Mädchen liest.",
    "Die Katze schläft.",
    "Leute gehen.",
    "Ein Junge rennt.",
]
STEPS = 8


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.en").write_text("\n".join(SOURCES) + "\n")
        (folder / f"{split}.de").write_text("\n".join(TARGETS) + "\n")
    return folder


def _run(data, output, model_dir, method="prompt", resume=False):
    # batch 4 over 6 examples: epochs wrap mid-run, so the data order position matters on resume.
    options = TrainOptions(
        max_steps=STEPS,
        batch_size=4,
        lr=0.05,
        warmup_steps=2,
        schedule="cosine",
        eval_every=3,
        eval_limit=6,
        checkpoint_every=0,
        max_length=64,
        device="cpu",
        seed=3,
    )
    return train_prompt(
        DataOptions(task="translation", data=str(data), task_options={"src": "en", "tgt": "de"}),
        PromptConfig(method=method, num_virtual_tokens=4, encoder="mlp"),
        options,
        output,
        model_name=str(model_dir),
        resume=resume,
        progress=False,
    )


def _interrupt_at(monkeypatch, step):
    original = Trainer._train_step

    def step_then_signal(self, order):
        result = original(self, order)
        if self.state.step == step:
            signal.raise_signal(signal.SIGINT)  # the real handler: finish the step, checkpoint, stop
        return result

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_resume_after_sigint_equals_an_uninterrupted_run(tmp_path, data, tiny_model_dir, monkeypatch, method):
    straight = _run(data, tmp_path / "straight", tiny_model_dir, method)
    assert straight.result.state.step == STEPS and not straight.result.interrupted

    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        stopped = _run(data, tmp_path / "resumed", tiny_model_dir, method)
    assert stopped.result.interrupted and stopped.result.state.step == 3
    assert load_checkpoint(tmp_path / "resumed")["state"]["step"] == 3

    resumed = _run(data, tmp_path / "resumed", tiny_model_dir, method, resume=True)
    assert resumed.result.state.step == STEPS
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for name, value in a["prompt"].items():
        assert torch.equal(value, b["prompt"][name]), name
    assert torch.equal(
        load_adapter(tmp_path / "straight").prompt_table, load_adapter(tmp_path / "resumed").prompt_table
    )
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in a["state"]["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in b["state"]["history"]]


def test_the_adapter_saved_on_sigint_generates(tmp_path, data, tiny_model_dir, monkeypatch):
    _interrupt_at(monkeypatch, 2)
    _run(data, tmp_path / "out", tiny_model_dir)
    generator = TorchGenerator.from_adapter(tmp_path / "out")
    out = generator.generate(
        [generator.encode({"source": "A dog."})],
        None,
        SearchOptions(max_new_tokens=3, eos_token_ids=[2], pad_token_id=2),
    )
    assert len(out) == 1 and len(out[0][0]) == 3


def test_resume_refuses_a_run_with_different_options(tmp_path, data, tiny_model_dir, monkeypatch):
    _interrupt_at(monkeypatch, 1)
    _run(data, tmp_path / "out", tiny_model_dir)
    with pytest.raises(SofttoolError, match="different run.*prompt"):
        _run(data, tmp_path / "out", tiny_model_dir, method="ptuning", resume=True)
