"""What ONNX Runtime's GroupQueryAttention takes as a prefill after a cached prefix (issue 30's first question).

One GroupQueryAttention node (rotary on, past and present sharing one buffer, as export/gqa.py writes it) is run
on the installed onnxruntime's CPU execution provider (fp32), or its CUDA one (--provider cuda, fp16): rows whose buffer already holds a prefix of P entries plus
a new chunk of several tokens, for one row and for several, unpadded and right-padded, and with the optional
query_seqlens input where the installed version knows it. Each case is accepted or refused (the error line), and
an accepted one is compared with plain causal attention over the whole row in numpy (the chunk's outputs and the
buffer's entries). The result is merged into --output under the installed version, so one file holds several:

    python benchmarks/gqa_chunk_probe.py --output benchmarks/results/gqa_chunk_probe.json
    # another version, unpacked from its wheel into a folder of its own:
    PYTHONPATH=/tmp/ort131 python benchmarks/gqa_chunk_probe.py --output benchmarks/results/gqa_chunk_probe.json

    # on a GPU with onnxruntime-gpu (benchmarks/gpu_full_speed.sh runs it):
    python benchmarks/gqa_chunk_probe.py --provider cuda --output gqa_chunk_probe_cuda.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HEADS, KV_HEADS, HEAD_DIM, MAX_POSITIONS = 4, 2, 16, 64
_ANGLES = np.arange(MAX_POSITIONS)[:, None] / (10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))[None]
COS, SIN = np.cos(_ANGLES).astype(np.float32), np.sin(_ANGLES).astype(np.float32)


def _session(query_seqlens: bool, provider: str):
    import onnxruntime as ort

    from onnx import TensorProto, helper, numpy_helper

    # GroupQueryAttention has no fp32 CUDA kernel: the CUDA probe is fp16 throughout.
    f = TensorProto.FLOAT16 if provider == "cuda" else TensorProto.FLOAT
    i32 = TensorProto.INT32
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos", "sin"]
    if query_seqlens:  # inputs 9-15 (position_ids .. k_norm_weight) left out, then query_seqlens
        names += [""] * 7 + ["query_seqlens"]
    node = helper.make_node(
        "GroupQueryAttention",
        names,
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        do_rotary=1,
    )
    cache = ["batch", KV_HEADS, "capacity", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("query", f, ["batch", "seq", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("key", f, ["batch", "seq", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("value", f, ["batch", "seq", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("past_key", f, cache),
        helper.make_tensor_value_info("past_value", f, cache),
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    if query_seqlens:
        inputs.append(helper.make_tensor_value_info("query_seqlens", i32, ["batch"]))
    outputs = [
        helper.make_tensor_value_info("output", f, ["batch", "seq", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("present_key", f, cache),
        helper.make_tensor_value_info("present_value", f, cache),
    ]
    dtype = np.float16 if provider == "cuda" else np.float32
    tables = [numpy_helper.from_array(t.astype(dtype), n) for n, t in (("cos", COS), ("sin", SIN))]
    graph = helper.make_graph([node], "probe", inputs, outputs, tables)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    providers = ["CUDAExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), providers=providers)


def _rotate(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The rotary embedding GroupQueryAttention applies (halves, not interleaved) to x [heads, T, D]."""
    cos, sin = COS[positions], SIN[positions]
    first, second = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def _reference(q, k, v):
    """Causal attention over one whole row (q/k/v [T, heads * D], before rotary): outputs [T, heads * D] and the
    rotated keys and the values [kv_heads, T, D] the cache should hold."""
    t = q.shape[0]
    positions = np.arange(t)
    qh = _rotate(q.reshape(t, HEADS, HEAD_DIM).transpose(1, 0, 2), positions)
    kh = _rotate(k.reshape(t, KV_HEADS, HEAD_DIM).transpose(1, 0, 2), positions)
    vh = v.reshape(t, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
    out = np.zeros((HEADS, t, HEAD_DIM), np.float32)
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        scores = np.where(np.tril(np.ones((t, t), bool)), qh[h] @ kh[g].T / np.sqrt(HEAD_DIM), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[h] = (probs / probs.sum(-1, keepdims=True)) @ vh[g]
    return out.transpose(1, 0, 2).reshape(t, HEADS * HEAD_DIM), kh, vh


def case(
    prefix: int,
    lengths: list[int],
    pad_to: int | None = None,
    query_seqlens: bool = False,
    provider: str = "cpu",
    seed: int = 0,
):
    """Rows whose buffer holds `prefix` entries, each with a new chunk of lengths[b] tokens, right-padded to
    `pad_to` (default: the longest), over a buffer of prefix + chunk + 1 columns (total_sequence_length: its width).
    Without query_seqlens, seqlens_k spans the padding (prefix + chunk - 1), as export/gqa.py's graph gives it."""
    rng = np.random.default_rng(seed)
    rows, chunk = len(lengths), pad_to or max(lengths)
    width = prefix + chunk + 1
    whole = [
        [
            rng.standard_normal((prefix + n, d)).astype(np.float32)
            for d in (HEADS * HEAD_DIM, *(2 * [KV_HEADS * HEAD_DIM]))
        ]
        for n in lengths
    ]
    past_key = np.zeros((rows, KV_HEADS, width, HEAD_DIM), np.float32)
    past_value = np.zeros_like(past_key)
    new = [np.zeros((rows, chunk, d), np.float32) for d in (HEADS * HEAD_DIM, *(2 * [KV_HEADS * HEAD_DIM]))]
    expected = []
    for b, (n, (q, k, v)) in enumerate(zip(lengths, whole, strict=True)):
        out, kh, vh = _reference(q, k, v)
        expected.append((out[prefix:], kh, vh))
        past_key[b, :, :prefix], past_value[b, :, :prefix] = kh[:, :prefix], vh[:, :prefix]
        for buf, full in zip(new, (q, k, v), strict=True):
            buf[b, :n] = full[prefix:]
    import onnxruntime as ort

    dtype = np.float16 if provider == "cuda" else np.float32
    session = _session(query_seqlens, provider)
    binding = session.io_binding()
    for name, buf in zip(("query", "key", "value"), new, strict=True):
        binding.bind_cpu_input(name, buf.astype(dtype))
    seqlens = [prefix + (n if query_seqlens else chunk) - 1 for n in lengths]
    binding.bind_cpu_input("seqlens_k", np.asarray(seqlens, np.int32))
    binding.bind_cpu_input("total_sequence_length", np.asarray(width, np.int32))
    if query_seqlens:
        binding.bind_cpu_input("query_seqlens", np.asarray(lengths, np.int32))
    binding.bind_output("output", "cpu")
    caches = []  # one device buffer per cache, bound as both past and present: written in place
    for past, present, buf in (("past_key", "present_key", past_key), ("past_value", "present_value", past_value)):
        value = ort.OrtValue.ortvalue_from_numpy(buf.astype(dtype), provider, 0)
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
        caches.append(value)
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types per status
        return {"accepted": False, "error": str(exc).splitlines()[0].split("Status Message: ")[-1]}
    output = binding.get_outputs()[0].numpy().astype(np.float32)
    past_key, past_value = (c.numpy().astype(np.float32) for c in caches)
    out_err = cache_err = 0.0
    for b, (n, (out, kh, vh)) in enumerate(zip(lengths, expected, strict=True)):
        out_err = max(out_err, float(np.abs(output[b, :n] - out).max(initial=0.0)))
        cache_err = max(cache_err, float(np.abs(past_key[b, :, : prefix + n] - kh).max()))
        cache_err = max(cache_err, float(np.abs(past_value[b, :, : prefix + n] - vh).max()))
    return {"accepted": True, "max_abs_diff_outputs": out_err, "max_abs_diff_cache": cache_err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda"), help="execution provider (cuda: fp16)")
    parser.add_argument("--output", default=None, help="JSON file to merge this version's cases into")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as capi

    schema = next(s for s in capi.get_all_operator_schema() if s.name == "GroupQueryAttention")
    knows = "query_seqlens" in [i.name for i in schema.inputs]
    on = args.provider
    cases = {
        "1 row, prefix 8 cached, chunk of 5": case(8, [5], provider=on),
        "1 row, prefix 8 cached, chunk of 3 right-padded to 6": case(8, [3], pad_to=6, provider=on),
        "2 rows, prefix 8 cached, chunks of 5 and 5": case(8, [5, 5], provider=on),
        "2 rows, prefix 8 cached, chunks of 5 and 3 right-padded": case(8, [5, 3], provider=on),
    }
    if knows:
        label = "query_seqlens: 2 rows, prefix 8 cached, chunks of 5 and 3 right-padded"
        cases[label] = case(8, [5, 3], query_seqlens=True, provider=on)
        label = "query_seqlens: 3 rows, prefix 8 cached, chunks of 5, 3 and 0 (idle)"
        cases[label] = case(8, [5, 3, 0], pad_to=8, query_seqlens=True, provider=on)
    provider = "CUDAExecutionProvider" if on == "cuda" else "CPUExecutionProvider"
    run = {"provider": provider, "dtype": "float16" if on == "cuda" else "float32", "knows_query_seqlens": knows}
    run["cases"] = cases
    key = f"{ort.__version__} {provider}"
    print(json.dumps({key: run}, indent=1))
    if args.output:
        path = Path(args.output)
        result = json.loads(path.read_text()) if path.is_file() else {"benchmark": "gqa_chunk_probe", "runs": {}}
        result["runs"][key] = run
        path.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
