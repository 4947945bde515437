"""The generation backends `softtool bench` compares, behind one small interface.

    peft       the PEFT library's prompt tuning (PeftModelForCausalLM.generate), same prompt weights, no KV cache
    peft-cache the same with PEFT's default KV cache (wrong tokens with peft 0.21.2 + transformers 5.24)
    hf         plain transformers generate on the same model, without any soft prompt, static batches
    hf-cb      transformers' own continuous batching (generate_batch) on the same texts, without the prompt
    hf-embeds  transformers generate on the same soft prompt and text as input embeddings, static batches: what
               a user without softtool runs, the same outputs and the same work
    hf-static  the same with cache_implementation="static", transformers' own compiled decode step (cuda only)
    torch      softtool's PyTorch backend (softtool.runtime, "torch")
    onnx       the exported ONNX graph on ONNX Runtime with the C++ search (softtool.runtime, "onnx")
    onnx-int8  the same with 8-bit weights

`generate(indices, max_new_tokens)` gets a whole workload (or one batch, for warm-up and time to first token)
and batches it the backend's own way. Each returns, per row, the best sequence's new tokens cut before the
first EOS. A backend that cannot run here raises `BackendUnavailable` with the reason; the harness reports it
as skipped instead of inventing numbers (and the smoke test fails on it).
"""

from __future__ import annotations

from pathlib import Path

from softtool.bench.options import BenchOptions
from softtool.bench.workload import Workload, default_cache_dir
from softtool.errors import SofttoolError


class BackendUnavailable(Exception):
    """This backend cannot run in this build or on this input (the message says why)."""


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    """New tokens before the first EOS (what a user gets; softtool.runtime returns them so too)."""
    out = []
    for t in tokens:
        if t == eos:
            break
        out.append(int(t))
    return out


class Backend:
    name = ""
    static_batches = True  # a batch runs until its longest row ends (row-steps are defined)
    uses_prompt = True  # its inputs are the soft prompt and the text (False: the text alone)
    capture_seconds = 0.0  # CUDA-graph capture paid at load (softtool's static step)

    def __init__(self, options: BenchOptions, workload: Workload) -> None:
        self.options = options
        self.workload = workload

    def load(self) -> None:
        """Load weights and graphs (not timed as generation)."""

    def generate(self, indices: range, max_new_tokens: int) -> list[list[int]]:
        raise NotImplementedError


class _HfBackend(Backend):
    """transformers generate on text-only rows, left-padded; PEFT adds its prompt in front."""

    use_prompt = False  # PEFT's prompt on the model
    use_cache = True

    @property
    def uses_prompt(self) -> bool:
        return self.use_prompt

    def load(self) -> None:
        from softtool.models import load_model

        device, dtype = self.options.device, self.options.dtype
        self.model = load_model(self.options.model, dtype=dtype, device=device)
        if self.use_prompt:
            try:
                from peft import PeftModel
            except ImportError as exc:
                raise BackendUnavailable("peft is not installed (pip install 'softtool[bench]')") from exc
            self.model = PeftModel.from_pretrained(self.model, str(self.workload.adapter_dir))
            # The prompt encoder is made in float32 on the CPU; put it beside the base weights.
            self.model.to(device=device, dtype=self.model.get_base_model().dtype)
            self.model.eval()

    def generate(self, indices: range, max_new_tokens: int) -> list[list[int]]:
        out: list[list[int]] = []
        for lo in range(indices.start, indices.stop, self.options.batch_size):
            out += self._generate_batch(range(lo, min(lo + self.options.batch_size, indices.stop)), max_new_tokens)
        return out

    def _generate_batch(self, indices: range, max_new_tokens: int) -> list[list[int]]:
        import torch

        from softtool.search import BatchOptions, build_batch

        rows = [self.workload.text_rows[i] for i in indices]
        # The product's batch builder: left padding, one text slot per row.
        batch = build_batch(
            [[r] for r in rows],
            0,
            [("text", 0)],
            BatchOptions(vocab_size=self.workload.vocab_size, padding_side="left", pad_id=self.workload.pad_token_id),
        )
        input_ids = torch.as_tensor(batch["input_ids"], device=self.options.device)
        mask = torch.as_tensor(batch["attention_mask"], device=self.options.device)
        width = input_ids.shape[1]
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **self._generate_kwargs(max_new_tokens))
        # Both plain and PEFT generate return the (text) input ids followed by the new tokens.
        return [cut_at_eos(seq[width:].tolist(), self.workload.eos_token_id) for seq in out]

    def _generate_kwargs(self, max_new_tokens: int) -> dict:
        """generate()'s settings: greedy (or beams) and the workload's decoding, as every row runs them."""
        from softtool.search import DECODING_OFF

        return dict(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=self.options.num_beams,
            eos_token_id=self.workload.eos_token_id,
            pad_token_id=self.workload.pad_token_id,
            use_cache=self.use_cache,
            **{name: self.workload.decoding.get(name, off) for name, off in DECODING_OFF.items()},
            temperature=None,
            top_p=None,
            top_k=None,
        )


class HfBackend(_HfBackend):
    name = "hf"


class PeftBackend(_HfBackend):
    """PEFT's generate without a KV cache: with peft 0.21.2 and transformers 5.24 the cached path goes wrong
    after the first new token, while the uncached one equals transformers'
    generate on [prompt; text] embeddings (tests/test_bench.py). The cached path is `peft-cache`."""

    name = "peft"
    use_prompt = True
    use_cache = False


class PeftCacheBackend(PeftBackend):
    """PEFT's default generate (KV cache on): faster, but its tokens diverge; shown for its speed only."""

    name = "peft-cache"
    use_cache = True


class HfEmbedsBackend(_HfBackend):
    """transformers generate on the soft prompt and the text as embeddings (`inputs_embeds`, left-padded, the
    virtual tokens where the template puts them): the same outputs as softtool and the same work, what a user
    without softtool runs. Given only embeddings, generate returns only the new tokens. transformers applies
    `no_repeat_ngram_size` to the new tokens only in this mode (it says so in a warning), where softtool's search
    also sees the input's real tokens: with that setting some rows differ (docs/bench.md)."""

    name = "hf-embeds"
    cache_implementation: str | None = None

    @property
    def uses_prompt(self) -> bool:
        return True

    def load(self) -> None:
        from softtool.adapter import load_adapter

        super().load()
        table = load_adapter(self.workload.adapter_dir).prompt_table
        self.table = table.to(device=self.model.device, dtype=self.model.dtype)

    def _generate_batch(self, indices: range, max_new_tokens: int) -> list[list[int]]:
        import torch

        from softtool.prompts.embedding import merge_embeddings

        rows = [self.workload.rows[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.workload.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = torch.as_tensor(row)
            mask[b, width - len(row) :] = 1
        device = self.model.device
        with torch.inference_mode():
            embeds = merge_embeddings(self.model, ids.to(device), self.table, self.workload.vocab_size)
            out = self.model.generate(
                inputs_embeds=embeds, attention_mask=mask.to(device), **self._generate_kwargs(max_new_tokens)
            )
        return [cut_at_eos(seq.tolist(), self.workload.eos_token_id) for seq in out]

    def _generate_kwargs(self, max_new_tokens: int) -> dict:
        kwargs = super()._generate_kwargs(max_new_tokens)
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
            # One cache length for the whole run (the longest row plus the budget), so that generate compiles
            # its decode step once and never again while timed.
            kwargs["max_cache_len"] = max(len(r) for r in self.workload.rows) + self.options.max_new_tokens
        return kwargs


class HfStaticBackend(HfEmbedsBackend):
    """hf-embeds with transformers' static cache, whose decode step generate compiles (torch.compile,
    reduce-overhead: CUDA graphs) on its own: transformers' fast path, one flag away for any user."""

    name = "hf-static"
    cache_implementation = "static"

    def load(self) -> None:
        if self.options.device == "cpu":
            raise BackendUnavailable(
                "transformers compiles its static-cache decode step on cuda only (generate's auto-compile criteria); "
                "on the CPU this row would be hf-embeds with a static cache and no compile"
            )
        super().load()


class HfCbBackend(Backend):
    """transformers' continuous batching (`generate_batch`, paged attention over SDPA) on the text-only rows,
    with `batch_size` requests per batch: the peer of softtool's own continuous batching."""

    name = "hf-cb"
    static_batches = False
    uses_prompt = False

    def load(self) -> None:
        from softtool.models import load_model
        from softtool.search import DECODING_OFF

        if any(self.workload.decoding.get(k, off) != off for k, off in DECODING_OFF.items()):
            # transformers 5.24 marks the repetition penalty's processor as unsupported by continuous batching
            # (it drops it) and leaves n-gram blocking unmarked ("might not be supported").
            raise BackendUnavailable(
                f"transformers' continuous batching does not apply {self.workload.decoding}; the row would do "
                "less work than the others"
            )
        self.model = load_model(
            self.options.model, dtype=self.options.dtype, device=self.options.device, attn_implementation="sdpa"
        )

    def generate(self, indices: range, max_new_tokens: int) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        rows = [self.workload.text_rows[i] for i in indices]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.workload.eos_token_id,
            pad_token_id=self.workload.pad_token_id,
        )
        batching = ContinuousBatchingConfig(max_requests_per_batch=self.options.batch_size)
        with torch.inference_mode():
            results = self.model.generate_batch(
                rows, generation_config=config, continuous_batching_config=batching, progress_bar=False
            )
        # Request ids are "req_<position>"; its tokens include the EOS when it stopped.
        ordered = sorted(results.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
        return [cut_at_eos(list(r.generated_tokens), self.workload.eos_token_id) for r in ordered]


class SofttoolBackend(Backend):
    """softtool.runtime's generators: the PyTorch backend on the adapter, ONNX Runtime on an export."""

    runtime = "torch"

    @property
    def static_batches(self) -> bool:
        return self.options.num_beams > 1 or not self.options.continuous

    def source_dir(self) -> Path:
        return self.workload.adapter_dir

    def runtime_kwargs(self) -> dict:
        return {"device": self.options.device, "dtype": self.options.dtype, "cuda_graphs": self.options.cuda_graphs}

    def load(self) -> None:
        from softtool.runtime import load_generator
        from softtool.runtime.decode import capacity_for

        try:
            self.generator = load_generator(str(self.source_dir()), self.runtime, **self.runtime_kwargs())
        except SofttoolError as exc:
            raise BackendUnavailable(f"softtool.runtime cannot load the {self.runtime} backend: {exc}") from exc
        engine = self.engine_options()
        if self.options.num_beams == 1 and engine.static_step(self.generator):
            # The static engine of the whole workload, made (and captured) now, so no timed pass captures.
            self.generator.static_slots(engine.slots, capacity_for(self.workload.rows, self.options.max_new_tokens))
            self.capture_seconds = self.generator.capture_seconds

    def engine_options(self):
        from softtool.runtime.decode import EngineOptions

        return EngineOptions(
            slots=self.options.batch_size * self.options.num_beams,
            continuous=self.options.continuous,
            step=self.options.step,
            admit_min=self.options.admit_min,
            prefill=self.options.prefill,
        )

    def generate(self, indices: range, max_new_tokens: int) -> list[list[int]]:
        from softtool.search import SearchOptions

        options = SearchOptions(
            max_new_tokens=max_new_tokens,
            num_beams=self.options.num_beams,
            eos_token_ids=[self.workload.eos_token_id],
            pad_token_id=self.workload.pad_token_id,
            **self.workload.decoding,
        )
        rows = [self.workload.pieces[i] for i in indices]
        beams = self.generator.generate(rows, [0] * len(rows), options, self.engine_options())
        return [cut_at_eos(list(row_beams[0]), self.workload.eos_token_id) for row_beams in beams]


class TorchBackend(SofttoolBackend):
    name = "torch"

    def runtime_kwargs(self) -> dict:
        return {**super().runtime_kwargs(), "compile_step": self.options.compile and self.options.device != "cpu"}


class OnnxBackend(SofttoolBackend):
    name = "onnx"
    runtime = "onnx"
    dtype = "float32"

    def source_dir(self) -> Path:
        given = self.options.onnx_int8_dir if self.dtype == "int8" else self.options.onnx_dir
        if given:
            return Path(given)
        return export_on_the_fly(self.options, self.workload.adapter_dir, self.dtype)

    def runtime_kwargs(self) -> dict:
        # strict: a CUDA bench must not quietly time ONNX Runtime on the CPU. The bench's thread count is the
        # session's intra-op thread count.
        device = self.options.onnx_device
        return {
            "device": device,
            "strict_device": device != "cpu",
            "threads": self.options.threads,
            "cuda_graphs": self.options.cuda_graphs,
        }


class OnnxInt8Backend(OnnxBackend):
    name = "onnx-int8"
    dtype = "int8"


BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in (
        PeftBackend,
        PeftCacheBackend,
        HfBackend,
        HfCbBackend,
        HfEmbedsBackend,
        HfStaticBackend,
        TorchBackend,
        OnnxBackend,
        OnnxInt8Backend,
    )
}


def export_on_the_fly(options: BenchOptions, adapter_dir: Path, dtype: str, progress=None) -> Path:
    """Export the adapter into the bench cache (once per adapter, model and dtype) with softtool.export."""
    import hashlib

    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.export_meta import ExportMeta
    from softtool.runtime.session import resolve_device

    if options.device != "cpu":
        if dtype == "int8":
            raise BackendUnavailable("the int8 graph (MatMulNBits weights) is for the CPU provider; not run on cuda")
        try:
            resolve_device("cuda", strict=True)
        except SofttoolError as exc:
            raise BackendUnavailable(str(exc)) from exc
        if options.dtype == "float16":
            dtype = "fp16"  # the GPU graph in the torch backends' precision
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    key = hashlib.sha1(weights + options.model.encode()).hexdigest()[:12]
    out = default_cache_dir(options) / f"export-{key}-{dtype}"
    try:
        ExportMeta.read(out)
        return out
    except SofttoolError:
        pass  # not exported yet (or an export of an older format): export afresh
    try:
        export_adapters(
            [str(adapter_dir)],
            out,
            ExportOptions(
                dtype=dtype if dtype in ("int8", "fp16") else "fp32",
                device=options.onnx_device,
                model=options.model,
                overwrite=True,
                verify_steps=options.export_verify_steps,
            ),
            progress=progress,
        )
    except SofttoolError as exc:
        raise BackendUnavailable(f"export ({dtype}) failed: {exc}") from exc
    return out
