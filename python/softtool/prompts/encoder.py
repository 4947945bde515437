"""The trainable prompt modules: a plain prompt table (prompt tuning, Lester et al. 2021) and a
prompt encoder (P-tuning, Liu et al. 2021: bidirectional LSTM + MLP head, or an MLP) over learned
input embeddings.

Both are nn.Modules whose `forward()` returns the prompt table [N, hidden]. After training the
module is run once and only that table is saved (softtool.adapter), so inference never needs the
encoder and a P-tuning result loads exactly like a prompt-tuning one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from softtool.prompts.template import Template

METHODS = ("prompt", "ptuning")
INITS = ("vocab", "text", "random")
ENCODERS = ("lstm", "mlp")
# Lester et al. sample initial prompts from the 5,000 most frequent tokens; BPE vocabularies put
# frequent merges at low ids, so the lowest ids stand in for "frequent" without a corpus.
VOCAB_INIT_RANGE = 5000
# N when none is given: 20 for both methods, the N every quality run measured at the default max length (256). The
# length study (benchmarks/results/study_length_squad_smollm2-135m.json) saw N=100 ahead only with 300 tokens of text
# room (max length 400), and it chose on the split it reported; the default waits for a study that chooses on dev.
DEFAULT_VIRTUAL_TOKENS = {"prompt": 20, "ptuning": 20}


@dataclass
class PromptConfig:
    """What to learn: the method, how many virtual tokens, where they go, and how they start."""

    method: str = field(
        default="prompt", metadata={"help": "prompt (prompt tuning) or ptuning (prompt encoder)", "choices": METHODS}
    )
    num_virtual_tokens: int | None = field(
        default=None,
        metadata={
            "help": "virtual tokens in total (ignored with --template); default 20, or for prompt tuning with --init text "
            "the init text's token count, so the prompt starts as exactly that text",
            "min": 1,
        },
    )
    init: str = field(
        default="vocab",
        metadata={
            "help": "start of the prompt table: vocab (sampled token embeddings), text (--init-text) or random",
            "choices": INITS,
        },
    )
    init_text: str | None = field(
        default=None,
        metadata={"help": "phrase whose embeddings start the prompt (init=text; default: the task's instruction)"},
    )
    encoder: str = field(
        default="lstm",
        metadata={"help": "P-tuning prompt encoder: lstm (BiLSTM + MLP head) or mlp", "choices": ENCODERS},
    )
    encoder_hidden_size: int = field(
        default=0, metadata={"help": "P-tuning encoder width (0: the model's hidden size)", "min": 0}
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "template with {field}s and [P:N] blocks of virtual tokens; without a block, N virtual tokens go "
            "first (default: the task's input, with N tokens first)"
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.num_virtual_tokens is not None and self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_hidden_size < 0:
            raise ValueError(f"encoder_hidden_size must be >= 0, got {self.encoder_hidden_size}")
        if self.init == "text" and self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text is empty; give the phrase whose embeddings start the prompt")
        if self.num_virtual_tokens is None and not self.counts_init_text:
            self.num_virtual_tokens = DEFAULT_VIRTUAL_TOKENS[self.method]
        if self.template is not None:
            n = Template.parse(self.template).num_virtual_tokens
            if n == 0 and self.num_virtual_tokens is not None:
                # A template without virtual tokens gets the default prefix, prompt tuning's layout (with init=text
                # and no N, once resolved() knows the init text's length).
                self.template = str(Template.prefix(self.num_virtual_tokens, self.template))
            elif n:
                self.num_virtual_tokens = n

    @property
    def counts_init_text(self) -> bool:
        """True when N is still to come from the init text's token count (prompt tuning, init=text, no N given)."""
        blocks = Template.parse(self.template).num_virtual_tokens if self.template else 0
        return self.num_virtual_tokens is None and self.init == "text" and self.method == "prompt" and not blocks

    def resolved(self, default_text: str, tokenizer) -> PromptConfig:
        """This config with init=text made concrete: the init text (default: `default_text`, the task's
        instruction prompt) and, where `counts_init_text`, N = its token count, so the step-0 prompt is
        exactly that text's embeddings. Other configs come back unchanged."""
        if self.init != "text":
            return self
        text = self.init_text or default_text
        n = self.num_virtual_tokens
        if self.counts_init_text:
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n == 0:
                raise ValueError(f"init_text {text!r} tokenizes to nothing")
        return replace(self, init_text=text, num_virtual_tokens=n)


def initial_table(config: PromptConfig, embed: nn.Module | torch.Tensor, tokenizer=None, seed: int = 0) -> torch.Tensor:
    """The starting prompt table [N, H] (float32), in the space the decoder layers see.

    `embed` is the model's input-embedding module: rows are looked up through it, so a module that scales
    its output (Gemma multiplies by sqrt(hidden)) gives scaled rows, exactly what its tokens become; a
    text-initialized prompt then reproduces that text's logits. A bare [V, H] tensor is taken as those rows.
    """
    n = config.num_virtual_tokens
    if n is None:
        raise ValueError("the prompt's size comes from its init text: call PromptConfig.resolved() first")
    if isinstance(embed, nn.Module):
        vocab = embed.weight.shape[0]
        device = embed.weight.device

        def rows(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return embed(ids.to(device)).detach().float().cpu()
    else:
        vocab = embed.shape[0]
        weight = embed.detach().float().cpu()

        def rows(ids: torch.Tensor) -> torch.Tensor:
            return weight[ids].clone()

    gen = torch.Generator().manual_seed(seed)
    if config.init == "random":
        # Match the embedding scale (measured on 4096 rows): a unit-variance table would dwarf the real tokens.
        sample = rows(torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:4096])
        return torch.randn(n, sample.shape[1], generator=gen) * sample.std()
    if config.init == "vocab":
        ids = torch.randint(0, min(vocab, VOCAB_INIT_RANGE), (n,), generator=gen)
        return rows(ids)
    if tokenizer is None or not config.init_text:
        raise ValueError("init=text needs the tokenizer and init_text (see PromptConfig.resolved)")
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {config.init_text!r} tokenizes to nothing")
    ids = (ids * (n // len(ids) + 1))[:n]  # repeat a short phrase, truncate a long one
    return rows(torch.tensor(ids))


class PromptTable(nn.Module):
    """Prompt tuning: the table itself is the parameter."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(table.clone().float())

    def forward(self) -> torch.Tensor:
        return self.weight


class PromptEncoder(nn.Module):
    """P-tuning: learned input embeddings reparameterized by a BiLSTM + MLP head (or an MLP).

    Virtual tokens of all template blocks form one sequence, so the LSTM lets blocks inform each
    other; the reparameterization is what makes P-tuning train more stably than a bare table.
    """

    def __init__(self, table: torch.Tensor, kind: str = "lstm", hidden_size: int = 0):
        super().__init__()
        n, dim = table.shape
        width = hidden_size or dim
        self.kind = kind
        self.input_embeddings = nn.Parameter(table.clone().float())
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, width // 2 or 1, num_layers=2, bidirectional=True, batch_first=True)
            lstm_out = 2 * (width // 2 or 1)
            self.head = nn.Sequential(nn.Linear(lstm_out, width), nn.ReLU(), nn.Linear(width, dim))
        elif kind == "mlp":
            self.head = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, dim))
        else:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")

    def forward(self) -> torch.Tensor:
        x = self.input_embeddings
        if self.kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.head(x)


def build_prompt_module(config: PromptConfig, model, tokenizer=None, seed: int = 0) -> nn.Module:
    """The trainable module for `config`, initialized from `model`'s input embeddings (seeded)."""
    table = initial_table(config, model.get_input_embeddings(), tokenizer, seed)
    if config.method == "prompt":
        return PromptTable(table)
    torch.manual_seed(seed)  # the encoder's layers draw from the global generator
    return PromptEncoder(table, config.encoder, config.encoder_hidden_size)


@torch.no_grad()
def export_table(module: nn.Module) -> torch.Tensor:
    """Run the prompt module once: the [N, H] table that the adapter stores."""
    was_training = module.training
    module.eval()
    table = module().detach().float().cpu().clone()
    module.train(was_training)
    return table
