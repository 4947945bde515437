"""The vLLM servers behind `softtool serve --engine vllm`: each one's health and requests in flight.

A request goes to the healthy backend with the fewest requests outstanding (ties in turn), so a slow or busy
server gets less; a backend is healthy when its last look (GET /health, every `interval` seconds, and a
connection that failed) said so. What each backend serves is read once from GET /v1/models: the model name a
request must carry.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

log = logging.getLogger("softtool.serve")


@dataclass
class Backend:
    """One vLLM server."""

    url: str  # http://host:port, without /v1
    outstanding: int = 0  # requests sent and not finished
    healthy: bool = False
    model: str | None = None  # the name it serves (GET /v1/models)
    error: str | None = None  # why it is not healthy

    def as_dict(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "outstanding": self.outstanding, "error": self.error}


def parse_urls(text: str) -> list[str]:
    """`URL[,URL...]` as the flag takes it; each must be http(s)://host:port (a trailing / or /v1 is dropped)."""
    urls = []
    for part in text.split(","):
        url = part.strip().rstrip("/").removesuffix("/v1")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"vLLM URL {part.strip()!r} must start with http:// or https://")
        urls.append(url)
    if not urls:
        raise ValueError("--vllm-url names no URL")
    if len(set(urls)) != len(urls):
        raise ValueError(f"--vllm-url names a server twice: {text}")
    return urls


class Balancer:
    """Least outstanding requests over the healthy backends; `lease` wraps one request."""

    def __init__(self, urls: list[str], *, interval: float = 5.0, timeout: float = 5.0):
        self.backends = [Backend(url) for url in urls]
        self.interval = interval
        self.timeout = timeout
        self._turn = 0  # where the next tie-break starts, so equal backends take turns

    @property
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def pick(self) -> Backend | None:
        """The healthy backend with the fewest requests outstanding (None when none is healthy)."""
        count = len(self.backends)
        order = [self.backends[(self._turn + i) % count] for i in range(count)]
        candidates = [b for b in order if b.healthy]
        if not candidates:
            return None
        self._turn = (self._turn + 1) % count
        return min(candidates, key=lambda b: b.outstanding)  # min keeps the first of equals: the turn's

    def mark_down(self, backend: Backend, reason: str) -> None:
        """A request could not reach it: skip it until a look finds it healthy again."""
        if backend.healthy:
            log.warning("vLLM at %s is down: %s", backend.url, reason)
        backend.healthy, backend.error = False, reason

    async def check(self, client: httpx.AsyncClient) -> None:
        """Look at every backend once (concurrently)."""
        await asyncio.gather(*(self._check_one(client, b) for b in self.backends))

    async def _check_one(self, client: httpx.AsyncClient, backend: Backend) -> None:
        try:
            response = await client.get(f"{backend.url}/health", timeout=self.timeout)
            if response.status_code != 200:
                raise RuntimeError(f"GET /health answered {response.status_code}")
            if backend.model is None:
                models = await client.get(f"{backend.url}/v1/models", timeout=self.timeout)
                models.raise_for_status()
                backend.model = models.json()["data"][0]["id"]
        except (httpx.HTTPError, RuntimeError, KeyError, IndexError, ValueError) as exc:
            self.mark_down(backend, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        if not backend.healthy:
            log.info("vLLM at %s is up (model %s)", backend.url, backend.model)
        backend.healthy, backend.error = True, None

    async def watch(self, client: httpx.AsyncClient) -> None:
        """Look again every `interval` seconds (until cancelled)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check(client)
