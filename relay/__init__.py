"""relay: a self-hosted, OpenAI-compatible LLM API relay on trio's structured concurrency."""

__version__ = "0.1.0"
