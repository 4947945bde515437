"""`softtool serve`: an OpenAI-compatible HTTP server for many soft prompts on one base model.

Three layers, as in vLLM's OpenAI entrypoint: `protocol` (the request and response shapes), `completions`
(requests to engine rows and back) over `engine` (the decode loop on its own thread) and `registry` (the
tasks and --adapters-dir), and `app` (routes, API key, metrics, the server's lifetime). See docs/serve.md.
"""

from softtool.serve.options import ServeOptions

__all__ = ["ServeOptions"]
