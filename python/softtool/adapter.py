"""The saved soft prompt ("adapter"): one folder that both softtool and PEFT can load.

    adapter_config.json        PEFT's PROMPT_TUNING config (PeftModel / AutoPeftModelForCausalLM load it)
    adapter_model.safetensors  {"prompt_embeddings": float32 [N, hidden]}, PEFT's key
    softtool.json              softtool's metadata: task, method, template, base model, metrics

`base_model_name_or_path` in adapter_config.json is what PEFT loads as the base: the base's hub id when it
has one (`HuggingFaceTB/SmolLM2-135M-Instruct` for the default `smollm2-135m`), else its local folder;
`peft_base="local"` (`softtool train --peft-base local`, or `set_peft_base` later) names the local folder
even when there is a hub id, so PEFT loads the base offline. softtool.json records both (`base_model_id`,
`base_model_path`) next to `base_model`, the name softtool itself loads.

P-tuning results are saved the same way: after training, the prompt encoder is run once and its
output is the prompt table, so inference (and PEFT, for prefix templates) never needs the encoder.
A folder with only PEFT's two files (a PEFT prompt-tuning result) loads too.

Loading checks what PEFT would trip over, in one line naming the file: adapter_config.json must be a
decoder-only prompt-tuning config whose token count and width match the tensor, and the prompt must be
finite. Every file is written to a temporary name and renamed into place (mode 0644 under the default
umask), so a crash mid-save never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from softtool import __version__
from softtool.errors import SofttoolError, written_by
from softtool.fileio import atomic_write_bytes, atomic_write_json
from softtool.models import base_model_ref

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "softtool.json"
PROMPT_KEY = "prompt_embeddings"
PEFT_BASES = ("hub", "local")  # what base_model_name_or_path names: the hub id when known, or the local folder
# adapter_config.json is written in the format of this PEFT release when PEFT is not installed (it records the
# installed version otherwise, as PEFT does).
PEFT_FORMAT_VERSION = "0.21.2"
_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")


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
    init_text: str | None = None  # the text a text-initialized prompt started from (PEFT's prompt_tuning_init_text)
    decoding: dict[str, Any] = field(default_factory=dict)  # the task's decoding defaults (SearchOptions fields)
    metrics: dict[str, Any] = field(default_factory=dict)  # best dev metrics, filled by training
    train_options: dict[str, Any] = field(default_factory=dict)
    softtool_version: str = __version__
    # Filled from base_model when saved (softtool.models.base_model_ref): the base's hub repository and the
    # absolute local folder it was loaded from (for the default model, the converted $SOFTTOOL_CACHE folder).
    base_model_id: str | None = None
    base_model_path: str | None = None


@dataclass
class Adapter:
    prompt_table: Any  # torch.Tensor [num_virtual_tokens, token_dim]
    meta: AdapterMeta


def peft_base_name(meta: AdapterMeta, peft_base: str = "hub") -> str:
    """What adapter_config.json names as the base: the hub id (or, without one, the local folder), or with
    peft_base="local" the local folder (or, without one, the hub id)."""
    if peft_base not in PEFT_BASES:
        raise ValueError(f"peft_base must be one of {PEFT_BASES}, got {peft_base!r}")
    order = (meta.base_model_id, meta.base_model_path)
    if peft_base == "local":
        order = order[::-1]
    return next((name for name in order if name), meta.base_model)


def _peft_version() -> str:
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return PEFT_FORMAT_VERSION


def peft_config(meta: AdapterMeta, model_config: Any | None = None, peft_base: str = "hub") -> dict[str, Any]:
    """PEFT's PromptTuningConfig fields for this prompt, as PEFT writes them."""
    init = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}.get(meta.init, "RANDOM")
    base = peft_base_name(meta, peft_base)
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "peft_version": _peft_version(),
        "base_model_name_or_path": base,
        "tokenizer_name_or_path": base,
        "num_virtual_tokens": meta.num_virtual_tokens,
        "token_dim": meta.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", None),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": meta.init_text if init == "TEXT" else None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }


def with_base_ref(meta: AdapterMeta) -> AdapterMeta:
    """`meta` with base_model_id / base_model_path filled from base_model where they are unset."""
    if meta.base_model_id or meta.base_model_path:
        return meta
    ref = base_model_ref(meta.base_model) if meta.base_model else None
    if ref is None:
        return meta
    return replace(meta, base_model_id=ref.hub_id, base_model_path=ref.local_path)


def save_adapter(
    path: str | os.PathLike, adapter: Adapter, model_config: Any | None = None, *, peft_base: str | None = None
) -> Path:
    """Write the adapter folder (atomically, file by file). Returns the folder.

    `peft_base` picks what adapter_config.json names as the base (see `peft_base_name`); by default the
    `peft_base` training option recorded in the metadata, else "hub".
    """
    import torch
    from safetensors.torch import save

    peft_base = peft_base or adapter.meta.train_options.get("peft_base") or "hub"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    table = adapter.prompt_table.detach().to("cpu", torch.float32).contiguous()
    if table.shape != (adapter.meta.num_virtual_tokens, adapter.meta.token_dim):
        raise ValueError(
            f"prompt table shape {tuple(table.shape)} does not match meta "
            f"({adapter.meta.num_virtual_tokens}, {adapter.meta.token_dim})"
        )
    if not bool(torch.isfinite(table).all()):
        raise SofttoolError(f"{out}: the prompt table holds NaN or infinite values; not saving it")
    meta = with_base_ref(adapter.meta)
    atomic_write_bytes(out / WEIGHTS_FILE, save({PROMPT_KEY: table}))
    atomic_write_json(out / CONFIG_FILE, peft_config(meta, model_config, peft_base))
    atomic_write_json(out / META_FILE, asdict(meta))
    return out


def set_peft_base(path: str | os.PathLike, peft_base: str) -> str:
    """Point an adapter's adapter_config.json at the base's hub id ("hub") or local folder ("local"), from
    what softtool.json records; returns the name written. For PEFT offline: set_peft_base(folder, "local")."""
    folder = Path(path)
    meta_path, config_path = folder / META_FILE, folder / CONFIG_FILE
    if not meta_path.is_file():
        raise SofttoolError(f"{folder}: {META_FILE} is missing, so the base's hub id and folder are unknown")
    meta = with_base_ref(_meta_from_file(meta_path))
    config = _read_json(config_path) if config_path.is_file() else peft_config(meta)
    name = peft_base_name(meta, peft_base)
    config.update(base_model_name_or_path=name, tokenizer_name_or_path=name)
    atomic_write_json(config_path, config)
    return name


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Load a softtool adapter, or a PEFT prompt-tuning adapter (then task and template are generic)."""
    import torch
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
    if not bool(torch.isfinite(table).all()):
        raise SofttoolError(f"{weights}: the prompt table holds NaN or infinite values; retrain it or restore the file")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise SofttoolError(f"{folder} is not an adapter: {CONFIG_FILE} is missing (PEFT needs it too)")
    config = _check_peft_config(config_path, _read_json(config_path), tuple(table.shape))
    meta_path = folder / META_FILE
    meta = _meta_from_file(meta_path) if meta_path.is_file() else _meta_from_peft(config, table)
    if tuple(table.shape) != (meta.num_virtual_tokens, meta.token_dim):
        raise SofttoolError(
            f"{weights} holds a {tuple(table.shape)} prompt but {meta_path} says "
            f"({meta.num_virtual_tokens}, {meta.token_dim}); restore the files or retrain"
        )
    return Adapter(table, meta)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SofttoolError(f"{path} is not valid JSON ({exc}); restore it or retrain") from exc
    if not isinstance(data, dict):
        raise SofttoolError(f"{path} must hold a JSON object, not {type(data).__name__}; restore it or retrain")
    return data


def _check_peft_config(path: Path, cfg: dict[str, Any], shape: tuple[int, int]) -> dict[str, Any]:
    """The checks PEFT's loader would fail on (with a traceback), made here in one line each."""

    def refuse(problem: str) -> SofttoolError:
        return SofttoolError(f"{path}: {problem}; fix the file or save the adapter again")

    if cfg.get("peft_type") not in _PEFT_TYPES:
        raise refuse(f"peft_type is {cfg.get('peft_type')!r}, softtool loads PROMPT_TUNING or P_TUNING adapters")
    if cfg.get("task_type") != "CAUSAL_LM":
        raise refuse(f"task_type is {cfg.get('task_type')!r}, a prompt for a causal LM has CAUSAL_LM")
    if cfg.get("num_transformer_submodules", 1) not in (1, None):
        raise refuse("num_transformer_submodules must be 1 (a decoder-only model)")
    for key, size, what in (("num_virtual_tokens", shape[0], "virtual tokens"), ("token_dim", shape[1], "hidden size")):
        value = cfg.get(key)
        if value is None and key == "token_dim":
            continue  # PEFT fills it from the base model
        if not isinstance(value, int) or isinstance(value, bool):
            raise refuse(f"{key} must be an integer, got {value!r}")
        if value != size:
            raise refuse(f"{key} is {value} but {WEIGHTS_FILE} holds a prompt of {size} {what}")
    return cfg


def _meta_from_file(path: Path) -> AdapterMeta:
    # Ignore keys a newer softtool may have added, so old installs still load new adapters.
    data = _read_json(path)
    known = {f.name for f in fields(AdapterMeta)}
    missing = [
        f.name
        for f in fields(AdapterMeta)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data
    ]
    written = written_by(data.get("softtool_version"))
    if missing:
        raise SofttoolError(f"{path} lacks {missing} ({written}); restore the file or retrain")
    try:
        return AdapterMeta(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise SofttoolError(f"{path} is malformed ({exc}; {written}); restore the file or retrain") from exc


def _meta_from_peft(cfg: dict[str, Any], table: Any) -> AdapterMeta:
    n = int(table.shape[0])
    base = cfg.get("base_model_name_or_path") or ""
    return AdapterMeta(
        base_model=base,
        num_virtual_tokens=n,
        token_dim=int(table.shape[1]),
        vocab_size=-1,  # unknown until the base model is loaded
        template=f"[P:{n}]{{input}}",
        init={"SAMPLE_VOCAB": "vocab", "TEXT": "text"}.get(cfg.get("prompt_tuning_init"), "random"),
        init_text=cfg.get("prompt_tuning_init_text"),
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
