"""`tunelab serve`: an OpenAI-compatible HTTP server (chat, completions, embeddings) with task endpoints
(classify, tag, answer, fill-mask, translate / summarize) over one model."""

from tunelab.serve.app import ServerSettings, create_app
from tunelab.serve.engine import Engine

__all__ = ["Engine", "ServerSettings", "create_app"]
