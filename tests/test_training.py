"""The training loop on the tiny model: the loss goes down, P-tuning with split blocks trains and its
saved table is the encoder's output, a non-finite loss stops the run, and the output folder is complete."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny_llama, write_translation_data
from softtool.adapter import load_adapter
from softtool.prompts.encoder import PromptConfig, PromptEncoder
from softtool.training import DataOptions, NonFiniteLoss, TrainOptions, train_prompt
from softtool.training.checkpoint import load_checkpoint

SOURCES = [
    "A man rides a bike.",
    "Two dogs play in the snow.",
    "A girl reads a book.",
    "The cat sleeps.",
    "People walk down the street.",
    "A boy kicks a ball.",
    "A woman sings.",
    "Three men fish.",
]
TARGETS = [
    "Ein Mann fährt Rad.",
    "Zwei Hunde spielen im Schnee.",
    "Ein Mädchen liest ein Buch.",
    "Die Katze schläft.",
    "Leute gehen die Straße entlang.",
    "Ein Junge tritt einen Ball.",
    "Eine Frau singt.",
    "Drei Männer angeln.",
]


@pytest.fixture(scope="module")
def responsive_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama with large random weights: with the usual 0.02 init the tiny model's output barely
    depends on its input, so no prompt could lower its loss and the overfit test would prove nothing."""
    return save_tiny_llama(tmp_path_factory.mktemp("responsive-llama"), smollm2_tokenizer, initializer_range=0.5)


def _train(tmp_path, model_dir, prompt=None, **opts):
    data = write_translation_data(tmp_path / "data", SOURCES, TARGETS)
    options = {
        "max_steps": 30,
        "batch_size": 4,
        "lr": 0.1,
        "warmup_steps": 0,
        "eval_every": 10,
        "eval_limit": 8,
        "checkpoint_every": 0,
        "max_length": 64,
        "device": "cpu",
        **opts,
    }
    return train_prompt(
        DataOptions(task="translation", data=str(data), task_options={"src": "en", "tgt": "de"}),
        prompt or PromptConfig(num_virtual_tokens=4),
        TrainOptions(**options),
        tmp_path / "out",
        model_name=str(model_dir),
        progress=False,
    )


def test_loss_decreases_on_a_tiny_overfit_set(tmp_path, responsive_model_dir):
    summary = _train(tmp_path, responsive_model_dir, lr=0.5, max_steps=20)
    history = summary.result.state.history
    dev = [row["dev_loss"] for row in history if row["kind"] == "eval"]
    train = [row["loss"] for row in history if row["kind"] == "train"]
    assert dev[-1] < dev[0] - 0.3
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5
    # The adapter keeps the best dev loss.
    meta = json.loads((tmp_path / "out" / "softtool.json").read_text())
    assert meta["metrics"]["dev_loss"] == pytest.approx(min(dev))


def test_output_folder_holds_adapter_metrics_plot_and_checkpoint(tmp_path, tiny_model_dir):
    _train(tmp_path, tiny_model_dir, max_steps=3, eval_every=0)
    out = tmp_path / "out"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "softtool.json",
        "metrics.jsonl",
        "metrics.csv",
        "loss.png",
        "run.json",
        "checkpoints/last.safetensors",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert load_adapter(out).prompt_table.shape == (4, 32)


def test_ptuning_split_template_trains_and_its_saved_table_is_the_encoder_output(tmp_path, tiny_model_dir):
    prompt = PromptConfig(method="ptuning", template="[P:3] English: {source} [P:2] German:", encoder="lstm")
    summary = _train(tmp_path, tiny_model_dir, prompt=prompt, max_steps=20, eval_every=0)
    dev = [r["dev_loss"] for r in summary.result.state.history if r["kind"] == "eval"]
    assert dev and all(torch.isfinite(torch.tensor(dev)))
    ckpt = load_checkpoint(tmp_path / "out")
    encoder = PromptEncoder(torch.zeros(5, 32), "lstm")
    encoder.load_state_dict(ckpt["prompt"])
    adapter = load_adapter(tmp_path / "out")
    assert adapter.meta.template == "[P:3]English: {source}[P:2]German:"
    assert adapter.meta.method == "ptuning"
    with torch.no_grad():
        assert torch.allclose(adapter.prompt_table, encoder.eval()(), atol=1e-6)
    # The encoder moved away from its initial input embeddings' image: it was trained.
    assert not torch.equal(ckpt["prompt"]["input_embeddings"], encoder.input_embeddings.new_zeros(5, 32))


def test_a_nonfinite_loss_stops_training_and_says_so(tmp_path, tiny_model_dir):
    with pytest.raises(NonFiniteLoss, match=r"loss became (nan|inf).*last good checkpoint"):
        # float16 weights: one step of lr 1e6 puts the prompt past float16's range (65504), the merged
        # embeddings become inf and the loss NaN - what a too-high lr does in half precision.
        _train(
            tmp_path,
            tiny_model_dir,
            lr=1e6,
            max_grad_norm=0.0,
            checkpoint_every=1,
            max_steps=10,
            eval_every=0,
            schedule="constant",
            dtype="float16",
        )
    # The checkpoint on disk is from before the bad step and holds finite values.
    ckpt = load_checkpoint(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in ckpt["prompt"].values())


def test_text_init_records_the_instruction_it_started_from_and_peft_reads_it(tmp_path, tiny_model_dir):
    from peft import PeftConfig

    from softtool.data import get_task

    _train(tmp_path, tiny_model_dir, PromptConfig(init="text"), max_steps=1, eval_every=0)
    instruction = get_task("translation", src="en", tgt="de").instruction_prompt
    adapter = load_adapter(tmp_path / "out")
    meta, n = adapter.meta, len(adapter.prompt_table)
    assert meta.init == "text" and meta.init_text == instruction
    assert meta.template.startswith(f"[P:{n}]") and n == meta.num_virtual_tokens < 20  # the instruction's tokens
    config = PeftConfig.from_pretrained(str(tmp_path / "out"))
    assert config.prompt_tuning_init == "TEXT" and config.prompt_tuning_init_text == instruction
