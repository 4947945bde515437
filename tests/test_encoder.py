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


def test_a_template_without_a_block_gets_n_virtual_tokens_in_front():
    assert PromptConfig(template="Context: {context}").template == "[P:20]Context: {context}"
    assert PromptConfig(template="Context: {context}", num_virtual_tokens=7).template == "[P:7]Context: {context}"
    # with --init text and no N, the block waits for the init text's length
    resolved = PromptConfig(template="Context: {context}", init="text", init_text="Read it.").resolved("", _Words())
    assert resolved.template == "[P:2]Context: {context}" and resolved.num_virtual_tokens == 2


class _Words:
    """A tokenizer of one id per word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "prefix"},
        {"init": "text", "init_text": "  "},
        {"num_virtual_tokens": 0},
        {"encoder": "gru"},
        {"encoder_hidden_size": -1},
    ],
)
def test_prompt_config_rejects_bad_combinations(kwargs):
    with pytest.raises(ValueError):
        PromptConfig(**kwargs)


@pytest.mark.parametrize("task_name", ["squad", "cnndm", "translation"])
def test_text_init_starts_as_exactly_the_tasks_instruction_prompt(task_name, tiny_model, smollm2_tokenizer):
    """--init text without a text or N: the step-0 soft prompt is the instruction prompt, N its token count,
    and the model's logits equal those of the discrete instruction prompt on the same input."""
    from softtool.data import encode_example, get_task
    from softtool.data.example import Example
    from softtool.prompts.embedding import merge_embeddings
    from softtool.prompts.template import assemble_ids

    task = get_task(task_name)
    config = PromptConfig(init="text").resolved(task.instruction_prompt, smollm2_tokenizer)
    instruction_ids = smollm2_tokenizer(task.instruction_prompt, add_special_tokens=False)["input_ids"]
    assert config.init_text == task.instruction_prompt and config.num_virtual_tokens == len(instruction_ids)
    fields = {"context": "The cat sat on the mat.", "question": "Where did the cat sit?",
              "article": "A cat sat on a mat all day.", "source": "A cat sits on a mat."}  # fmt: skip
    example = Example("0", {f: fields[f] for f in task.fields}, ["x"])
    soft = task.default_template(config.num_virtual_tokens)
    vocab = tiny_model.get_input_embeddings().weight.shape[0]
    soft_ids = assemble_ids(soft, encode_example(smollm2_tokenizer, soft, task, example, with_target=False).pieces,
                            vocab)  # fmt: skip
    plain = encode_example(smollm2_tokenizer, task.baseline_template(), task, example, with_target=False).pieces
    table = build_prompt_module(config, tiny_model, smollm2_tokenizer)()
    with torch.no_grad():
        got = tiny_model(inputs_embeds=merge_embeddings(tiny_model, torch.tensor([soft_ids]), table, vocab)).logits
        want = tiny_model(input_ids=torch.tensor([[i for piece in plain for i in piece]])).logits
    assert torch.equal(got, want)


def test_without_n_both_methods_learn_20_virtual_tokens():
    """The measured default (README "What to choose"); a template or an explicit N still wins."""
    assert PromptConfig().num_virtual_tokens == 20
    assert PromptConfig(method="ptuning").num_virtual_tokens == 20
    assert PromptConfig(num_virtual_tokens=20).num_virtual_tokens == 20
    assert PromptConfig(template="[P:8]{source}").num_virtual_tokens == 8


def test_text_init_keeps_a_given_size_and_ptuning_keeps_twenty(smollm2_tokenizer):
    given = PromptConfig(init="text", num_virtual_tokens=7).resolved("Translate this.\n", smollm2_tokenizer)
    assert given.num_virtual_tokens == 7 and given.init_text == "Translate this.\n"
    ptuning = PromptConfig(method="ptuning", init="text").resolved("Translate this.\n", smollm2_tokenizer)
    assert ptuning.num_virtual_tokens == 20  # the encoder's output cannot reproduce the text anyway
    assert PromptConfig(init="vocab").resolved("ignored", smollm2_tokenizer).init_text is None
