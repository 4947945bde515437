"""The shared-prefix training path equals the naive one (prompt concatenated to every row): loss and
prompt gradient, on the tiny model and on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from helpers import loss_and_grad, training_features
from softtool.models import load_model
from softtool.prompts.template import Template

SOURCES = ["A man rides a red bike.", "Two dogs.", "A woman in a blue coat waits for the bus near a shop."]
TARGETS = [" Ein Mann fährt ein rotes Fahrrad.", " Zwei Hunde.", " Eine Frau wartet."]


def _check(model, tokenizer, n=6):
    vocab = model.get_input_embeddings().weight.shape[0]
    template = Template.prefix(n, "English: {source}\nGerman:")
    feats = training_features(tokenizer, template, vocab, SOURCES, TARGETS)
    torch.manual_seed(0)
    table = model.get_input_embeddings().weight[torch.randint(0, 5000, (n,))].detach()
    naive_loss, naive_grad = loss_and_grad(model, feats, table, 0, vocab)
    cached_loss, cached_grad = loss_and_grad(model, feats, table, n, vocab)
    assert cached_loss == pytest.approx(naive_loss, rel=1e-5)
    assert torch.allclose(cached_grad, naive_grad, rtol=1e-4, atol=1e-5 * naive_grad.abs().max().item())
    return naive_grad


def test_prefix_cache_equals_naive_loss_and_grad_on_tiny_model(tiny_model_dir, smollm2_tokenizer):
    grad = _check(load_model(str(tiny_model_dir)), smollm2_tokenizer)
    assert grad.abs().sum() > 0


@pytest.mark.slow
def test_prefix_cache_equals_naive_loss_and_grad_on_smollm2(smollm2, smollm2_tokenizer):
    grad = _check(smollm2, smollm2_tokenizer, n=4)
    assert grad.abs().sum() > 0
