"""int8 for the CPU: ONNX Runtime's dynamic quantization of the weight matrices (activations stay float)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def quantize_int8(path: str | os.PathLike) -> None:
    """Replace the fp32 graph at `path` with a dynamically quantized one (MatMul weights int8, per channel).

    Only MatMul is quantized: the embedding Gather and the prompt-table lookup stay float, so soft prompts
    (which are not vocabulary rows) keep their exact values.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        target = Path(tmp) / path.name
        quantize_dynamic(
            path,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=False,
        )
        data.unlink(missing_ok=True)
        os.replace(target, path)
