"""softtool: learn soft prompts against a frozen language model, export them, and decode fast.

Sub-packages, one concern each:
  prompts/   the virtual-token template and the prompt modules (prompt tuning, P-tuning encoder)
  data/      readers for the data formats users have, and the tasks (formatting, truncation)
  training/  the training loop against the frozen model, checkpoints, loss plots
  runtime/   generation backends (PyTorch, ONNX Runtime) driven by the C++ search core
  cli/       the `softtool` command line
The C++ core is `softtool._core`; the ONNX exporter is `softtool.export`.
"""

__version__ = "0.2.0"
