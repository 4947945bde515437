"""Benchmarks of softtool's speed against PEFT prompt tuning, plain transformers and the machine's limits.

options   what one run measures (BenchOptions, TrainBenchOptions; benchmarks/configs/*.json hold them)
workload  the examples and their token rows, shared by every backend; the untrained prompt
backends  peft, hf, torch, onnx, onnx-int8 behind one generate() interface
measure   timing one backend (also the worker that runs it in a fresh process)
limits    the machine: CPU, versions, memory bandwidth and matmul FLOP/s
runner    run_bench(options): everything above, compared and scored (task classify: run_rank_bench)
rank      task classify: the rank-classification workload (examples, labels, batches) and the comparison with
          its peer, hf-rank (one full row per example and label)
rank_backends  hf-rank, torch, onnx scoring labels, and timing one (also the worker that runs it alone)
train     run_train_bench(options): softtool's training step against PEFT's
report    table, JSON and PNG chart
"""

from softtool.bench.options import BenchOptions, TrainBenchOptions

__all__ = ["BenchOptions", "TrainBenchOptions"]
