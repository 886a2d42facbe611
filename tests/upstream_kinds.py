"""One account of each upstream kind on the simulated upstream: the configuration of the tests
that run a client protocol over every kind (tests/test_translation_matrix.py for Chat and
Responses clients, tests/test_messages.py for Messages clients)."""

from __future__ import annotations

#: Upstream kind → the one model its account serves, and the API prefix of its base URL
#: (Gemini's is ``/v1beta``).
KINDS = {
    "openai-chat": ("m-chat", "/v1"),
    "openai-responses": ("m-responses", "/v1"),
    "anthropic": ("m-anthropic", "/v1"),
    "gemini": ("m-gemini", "/v1beta"),
}


def kind_accounts(pool: str = "p") -> str:
    """``[[accounts]]`` tables: one account per kind, named after its kind, in ``pool``,
    serving the model :data:`KINDS` gives it (``SIM_URL`` is the simulated upstream's URL)."""
    return "".join(
        f"""
[[accounts]]
name = "{kind}"
pool = "{pool}"
provider = "{kind}"
base_url = "SIM_URL{prefix}"
api_key_env = "SIM_UPSTREAM_KEY"
models = ["{model}"]
"""
        for kind, (model, prefix) in KINDS.items()
    )
