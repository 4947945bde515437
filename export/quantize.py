"""int8 for the CPU: the weight matrices of every MatMul stored as 8-bit integers.

Two methods, measured on SmolLM2 (benchmarks/results/export_smollm2.json):
  weight-only (default)  MatMulNBits, 8 bits, blocks of 32 along K, symmetric; activations stay float and are
                         quantized per block only inside the kernel (accuracy level 4). Close to fp32 in tokens.
  dynamic                onnxruntime's quantize_dynamic: activations quantized per tensor at run time. LLM
                         activations have outlier channels, so on SmolLM2 the logits move by ~20 and greedy
                         tokens diverge early; kept for comparison.
The embedding Gather and the prompt-table lookup stay float either way, so soft prompts keep their exact values.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

INT8_METHODS = ("weight-only", "dynamic")


def quantize_int8(path: str | os.PathLike, method: str = "weight-only") -> None:
    """Replace the fp32 graph at `path` (single file) with its int8 version."""
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        target = Path(tmp) / path.name
        if method == "weight-only":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # It logs two INFO lines per graph node ("skip to quantize ..."): hundreds of lines a user
            # never needs; warnings still come through.
            logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

            quantizer = MatMulNBitsQuantizer(str(path), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
            quantizer.process()
            quantizer.model.save_model_to_file(str(target), False)
        elif method == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                path,
                target,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                use_external_data_format=False,
            )
        else:
            raise ValueError(f"int8 method must be one of {INT8_METHODS}, got {method!r}")
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        os.replace(target, path)
