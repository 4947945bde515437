"""softtool.export: bake a trained soft prompt into an ONNX graph with a KV cache (see `softtool export`)."""
