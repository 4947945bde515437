"""The saved soft prompt ("adapter"): one folder that both softtool and PEFT can load.

    adapter_config.json        PEFT's PROMPT_TUNING config (so peft.PeftModel.from_pretrained works)
    adapter_model.safetensors  {"prompt_embeddings": float32 [N, hidden]}, PEFT's key
    softtool.json              softtool's metadata: task, method, template, base model, metrics

P-tuning results are saved the same way: after training, the prompt encoder is run once and its
output is the prompt table, so inference (and PEFT, for prefix templates) never needs the encoder.
A folder with only PEFT's two files (a PEFT prompt-tuning result) loads too.

Every file is written to a temporary name and renamed into place, so a crash mid-save never
leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from softtool import __version__
from softtool.errors import SofttoolError
from softtool.fileio import atomic_write_bytes, atomic_write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "softtool.json"
PROMPT_KEY = "prompt_embeddings"


@dataclass
class AdapterMeta:
    """softtool's own metadata about a trained prompt (softtool.json)."""

    base_model: str  # what `softtool.models.load_model` was given (name, folder or hub id)
    num_virtual_tokens: int
    token_dim: int
    vocab_size: int  # the base model's input vocabulary; virtual ids start here
    template: str  # e.g. "[P:20]English: {source}\nGerman:" (see softtool.prompts.template)
    task: str = "generic"  # squad, squad-qg, cnndm, translation, or generic
    method: str = "prompt"  # prompt (Lester et al.) or ptuning (Liu et al.)
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"src": "en", "tgt": "de"}
    init: str = "vocab"
    metrics: dict[str, Any] = field(default_factory=dict)  # best dev metrics, filled by training
    train_options: dict[str, Any] = field(default_factory=dict)
    softtool_version: str = __version__


@dataclass
class Adapter:
    prompt_table: Any  # torch.Tensor [num_virtual_tokens, token_dim]
    meta: AdapterMeta


def peft_config(meta: AdapterMeta, model_config: Any | None = None) -> dict[str, Any]:
    """PEFT's PromptTuningConfig fields for this prompt, as PEFT writes them."""
    init = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}.get(meta.init, "RANDOM")
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_model,
        "tokenizer_name_or_path": meta.base_model,
        "num_virtual_tokens": meta.num_virtual_tokens,
        "token_dim": meta.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", None),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }


def save_adapter(path: str | os.PathLike, adapter: Adapter, model_config: Any | None = None) -> Path:
    """Write the adapter folder (atomically, file by file). Returns the folder."""
    import torch
    from safetensors.torch import save

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    table = adapter.prompt_table.detach().to("cpu", torch.float32).contiguous()
    if table.shape != (adapter.meta.num_virtual_tokens, adapter.meta.token_dim):
        raise ValueError(
            f"prompt table shape {tuple(table.shape)} does not match meta "
            f"({adapter.meta.num_virtual_tokens}, {adapter.meta.token_dim})"
        )
    atomic_write_bytes(out / WEIGHTS_FILE, save({PROMPT_KEY: table}))
    atomic_write_json(out / CONFIG_FILE, peft_config(adapter.meta, model_config))
    atomic_write_json(out / META_FILE, asdict(adapter.meta))
    return out


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Load a softtool adapter, or a PEFT prompt-tuning adapter (then task and template are generic)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise SofttoolError(f"adapter folder not found: {folder}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SofttoolError(f"{folder} is not an adapter: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SofttoolError(f"{weights} is corrupt or unreadable ({exc}); retrain or restore it") from exc
    if PROMPT_KEY not in tensors:
        raise SofttoolError(f"{weights} has no '{PROMPT_KEY}' tensor (found {sorted(tensors)})")
    table = tensors[PROMPT_KEY].float()
    if table.ndim != 2:
        raise SofttoolError(f"{weights}: '{PROMPT_KEY}' must be 2-D [tokens, hidden], got shape {tuple(table.shape)}")
    meta_path = folder / META_FILE
    meta = _meta_from_file(meta_path) if meta_path.is_file() else _meta_from_peft(folder, table)
    if table.shape[0] != meta.num_virtual_tokens:
        raise SofttoolError(
            f"{weights} holds {table.shape[0]} virtual tokens but the config says {meta.num_virtual_tokens}"
        )
    return Adapter(table, meta)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SofttoolError(f"{path} is not valid JSON ({exc}); restore it or retrain") from exc


def _meta_from_file(path: Path) -> AdapterMeta:
    # Ignore keys a newer softtool may have added, so old installs still load new adapters.
    data = _read_json(path)
    known = {f.name for f in fields(AdapterMeta)}
    missing = [
        f.name
        for f in fields(AdapterMeta)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data
    ]
    if missing:
        raise SofttoolError(f"{path} lacks {missing}; restore the file or retrain")
    return AdapterMeta(**{k: v for k, v in data.items() if k in known})


def _meta_from_peft(folder: Path, table: Any) -> AdapterMeta:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise SofttoolError(f"{folder} is not an adapter: {CONFIG_FILE} is missing")
    cfg = _read_json(config_path)
    if cfg.get("peft_type") not in ("PROMPT_TUNING", "P_TUNING"):
        raise SofttoolError(f"{config_path}: softtool loads prompt-tuning adapters, not {cfg.get('peft_type')}")
    n = int(cfg["num_virtual_tokens"])
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise SofttoolError(f"{config_path}: only decoder-only (one transformer submodule) prompts are supported")
    return AdapterMeta(
        base_model=cfg.get("base_model_name_or_path") or "",
        num_virtual_tokens=n,
        token_dim=int(cfg.get("token_dim") or table.shape[1]),
        vocab_size=-1,  # unknown until the base model is loaded
        template=f"[P:{n}]{{input}}",
        init={"SAMPLE_VOCAB": "vocab", "TEXT": "text"}.get(cfg.get("prompt_tuning_init"), "random"),
    )


def check_compatible(adapter: Adapter, model: Any) -> None:
    """Refuse an adapter whose hidden size or vocabulary does not match the loaded base model."""
    embed = model.get_input_embeddings()
    hidden, vocab = embed.weight.shape[1], embed.weight.shape[0]
    if adapter.prompt_table.shape[1] != hidden:
        raise SofttoolError(
            f"adapter prompt has hidden size {adapter.prompt_table.shape[1]} but the model "
            f"{adapter.meta.base_model or ''} has {hidden}; use the base model the prompt was trained on"
        )
    if adapter.meta.vocab_size not in (-1, vocab):
        raise SofttoolError(
            f"adapter was trained with vocabulary size {adapter.meta.vocab_size} but the model has {vocab}; "
            "use the base model the prompt was trained on"
        )
