"""The prompt modules: initializations, the P-tuning encoder, and PromptConfig's checks."""

from __future__ import annotations

import pytest
import torch

from softtool.models import load_model
from softtool.prompts.encoder import PromptConfig, PromptEncoder, PromptTable, build_prompt_module, export_table


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_text_init_repeats_the_phrase_embeddings_to_n_tokens(tiny, smollm2_tokenizer):
    config = PromptConfig(num_virtual_tokens=7, init="text", init_text="Translate this")
    module = build_prompt_module(config, tiny, smollm2_tokenizer)
    ids = smollm2_tokenizer("Translate this", add_special_tokens=False)["input_ids"]
    expected = [ids[i % len(ids)] for i in range(7)]
    assert torch.equal(module(), tiny.get_input_embeddings().weight[expected])


def test_vocab_init_rows_are_vocabulary_embeddings_and_seeded(tiny):
    weight = tiny.get_input_embeddings().weight
    a = build_prompt_module(PromptConfig(num_virtual_tokens=5), tiny, seed=1)()
    b = build_prompt_module(PromptConfig(num_virtual_tokens=5), tiny, seed=1)()
    c = build_prompt_module(PromptConfig(num_virtual_tokens=5), tiny, seed=2)()
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        assert (weight == row).all(dim=1).any()


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_ptuning_encoder_outputs_the_table_and_trains_all_its_parameters(tiny, kind):
    module = build_prompt_module(PromptConfig(method="ptuning", num_virtual_tokens=6, encoder=kind), tiny)
    assert isinstance(module, PromptEncoder)
    table = module()
    assert table.shape == (6, 32)
    table.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # eval-mode (inference) LSTM kernels may round differently from the training ones
    assert torch.allclose(export_table(module), table.detach(), atol=1e-6)


def test_prompt_table_is_a_single_parameter(tiny):
    module = build_prompt_module(PromptConfig(num_virtual_tokens=4, init="random"), tiny)
    assert isinstance(module, PromptTable)
    assert [p.shape for p in module.parameters()] == [torch.Size([4, 32])]


def test_prompt_config_takes_the_token_count_from_the_template():
    assert PromptConfig(template="[P:3] Context: {context} [P:2] Question:").num_virtual_tokens == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "prefix"},
        {"init": "text"},
        {"num_virtual_tokens": 0},
        {"encoder": "gru"},
        {"template": "Context: {context}"},
    ],
)
def test_prompt_config_rejects_bad_combinations(kwargs):
    with pytest.raises(ValueError):
        PromptConfig(**kwargs)
