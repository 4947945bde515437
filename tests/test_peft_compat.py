"""PEFT interop: a softtool prompt loads in peft.PeftModel and generates the same tokens as softtool's
torch backend; a prompt saved by PEFT loads in softtool and generates what PEFT generates."""

from __future__ import annotations

import pytest
import torch

from softtool.adapter import Adapter, AdapterMeta, load_adapter, save_adapter
from softtool.models import load_model
from softtool.runtime.torch_backend import TorchGenerator
from softtool.search import SearchOptions

peft = pytest.importorskip("peft")

TEXTS = ["English: A man rides a bike.\nGerman:", "English: Two dogs play.\nGerman:"]
OPTIONS = SearchOptions(max_new_tokens=8, eos_token_ids=[2], pad_token_id=2)


def _peft_generate(peft_model, tokenizer, text):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = peft_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=2,
    )[0].tolist()
    # PEFT returns the prompt's input ids followed by the new tokens.
    new = out[ids.shape[1] :] if out[: ids.shape[1]] == ids[0].tolist() else out
    return new[: new.index(2)] if 2 in new else new


def _ours(path, model, tokenizer, template=None):
    generator = TorchGenerator.from_adapter(path, model=model, tokenizer=tokenizer, template=template)
    field = generator.template.fields[0]
    return [out[0] for out in generator.generate([generator.encode({field: t}) for t in TEXTS], None, OPTIONS)]


def test_a_softtool_prompt_loads_in_peft_and_generates_the_same_tokens(tmp_path, tiny_model_dir, smollm2_tokenizer):
    torch.manual_seed(0)
    table = load_model(str(tiny_model_dir)).get_input_embeddings().weight[torch.randint(0, 5000, (4,))] * 4
    meta = AdapterMeta(
        base_model=str(tiny_model_dir),
        num_virtual_tokens=4,
        token_dim=32,
        vocab_size=49152,
        template="[P:4]{input}",
        task="generic",
    )
    path = save_adapter(tmp_path / "adapter", Adapter(table, meta))
    peft_model = peft.PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(path))
    expected = [_peft_generate(peft_model, smollm2_tokenizer, t) for t in TEXTS]
    assert all(expected)
    assert _ours(path, load_model(str(tiny_model_dir)), smollm2_tokenizer) == expected


def test_a_peft_prompt_loads_in_softtool_and_generates_the_same_tokens(tmp_path, tiny_model_dir, smollm2_tokenizer):
    torch.manual_seed(1)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init=peft.PromptTuningInit.RANDOM
    )
    peft_model = peft.get_peft_model(load_model(str(tiny_model_dir)), config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.mul_(20)  # make the prompt matter to the output
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.meta.template == "[P:5]{input}" and adapter.prompt_table.shape == (5, 32)
    expected = [_peft_generate(peft_model.eval(), smollm2_tokenizer, t) for t in TEXTS]
    assert _ours(tmp_path / "peft", load_model(str(tiny_model_dir)), smollm2_tokenizer) == expected
