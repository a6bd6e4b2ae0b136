"""`tunelab serve`: an OpenAI-compatible HTTP server (chat, completions, embeddings) with task endpoints
(classify, tag, answer, fill-mask, translate / summarize) over one model, and a feedback page at / that writes a
person's ratings, critiques and corrections of its answers to the feedback store (feedback_page.py)."""

from tunelab.serve.app import ServerSettings, create_app
from tunelab.serve.engine import Engine

__all__ = ["Engine", "ServerSettings", "create_app"]
