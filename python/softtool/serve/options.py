"""`softtool serve`'s settings: one dataclass whose fields are the command's flags (softtool.options)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

BACKENDS = ("torch", "onnx")
ENGINES = ("softtool", "vllm")  # who decodes: softtool's engine in this process, or vLLM servers (serve/vllm)


@dataclass
class ServeOptions:
    """Where the server listens, how the engine batches, and the limits a request must keep."""

    adapters_dir: str | None = field(
        default=None,
        metadata={
            "help": "serve every adapter folder in DIR (its name is the task); folders added later are picked up "
            "without a restart",
            "metavar": "DIR",
        },
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to bind (a non-loopback one without --api-key is warned about)"},
    )
    port: int = field(default=8000, metadata={"help": "port to bind (0: any free port)", "min": 0, "max": 65535})
    backend: str | None = field(
        default=None,
        metadata={
            "help": "onnx for an export folder, torch for adapter folders (default: from the paths)",
            "choices": BACKENDS,
        },
    )
    engine: str = field(
        default="softtool",
        metadata={
            "help": "softtool: decode here; vllm: send each row to the vLLM servers of --vllm-url as prompt_embeds "
            "(adapter folders only; docs/serve.md, Scaling out)",
            "choices": ENGINES,
        },
    )
    vllm_url: str | None = field(
        default=None,
        metadata={
            "help": "with --engine vllm: the vLLM servers (started with --enable-prompt-embeds), comma-separated; "
            "each request goes to the healthy one with the fewest requests outstanding",
            "metavar": "URL[,URL...]",
        },
    )
    vllm_processor: bool = field(
        default=True,
        metadata={
            "help": "with --engine vllm: the servers run softtool's logits processor (scripts/vllm_server.sh), so "
            "a task's no-repeat n-gram and repetition penalty apply; off: they do not, and each response says so "
            "in its X-Softtool-Not-Applied header"
        },
    )
    slots: int = field(default=16, metadata={"help": "rows decoded together (the engine's KV cache batch)", "min": 1})
    max_queue: int = field(
        default=256,
        metadata={"help": "rows that may wait for a slot; a request beyond that is answered 429", "min": 0},
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "context per row: prompt tokens (virtual tokens included) plus max_tokens; the KV cache's length",
            "min": 8,
        },
    )
    max_tokens: int = field(default=256, metadata={"help": "the largest max_tokens a request may ask for", "min": 1})
    max_n: int = field(
        default=8, metadata={"help": "the largest n (choices per prompt) a request may ask for", "min": 1}
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "require `Authorization: Bearer KEY` on /v1/ (default: $SOFTTOOL_API_KEY when set)",
            "metavar": "KEY",
        },
    )
    watch_interval: float = field(default=2.0, metadata={"help": "seconds between looks at --adapters-dir", "min": 0.1})
    shutdown_timeout: float = field(
        default=30.0,
        metadata={"help": "on SIGTERM, seconds to let requests in flight finish before cancelling them", "min": 0},
    )
    model: str | None = field(
        default=None, metadata={"help": "base model for adapter folders (default: the one the first adapter names)"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda", "choices": ("cpu", "cuda")})
    log_level: str = field(
        default="info",
        metadata={"help": "uvicorn's log level", "choices": ("critical", "error", "warning", "info", "debug")},
    )

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "vllm" and not self.vllm_url:
            raise ValueError("--engine vllm needs --vllm-url URL[,URL...]")
        if self.engine != "vllm" and self.vllm_url:
            raise ValueError("--vllm-url is for --engine vllm")
        if self.engine == "vllm" and self.backend == "onnx":
            raise ValueError("--engine vllm decodes on vLLM; --backend onnx does not apply")
        if self.slots < 1 or self.max_queue < 0 or self.max_n < 1:
            raise ValueError("slots and max_n must be >= 1 and max_queue >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_tokens >= self.max_length:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be below max_length ({self.max_length}): a prompt needs room"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")

    @property
    def loopback(self) -> bool:
        """Whether `host` reaches only this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
