"""LiteLLM's proxy as the benchmark's peer: installed into its own virtual environment, one
worker, everything that adds work or network calls turned off, pointed at the same simulated
upstream as the relay.

The virtual environment lives in ``bench/.venv-litellm`` (gitignored). It is created on first use
with the machine's Python 3.11 and ``pip install 'litellm[proxy]==VERSION'``, and reused while its
stamp file says that version is installed. If it cannot be installed or started, the benchmark
says why and reports the peer as unavailable: it never makes up the peer's numbers.

The version is pinned: ``litellm[proxy]`` releases after 1.106 depend on a ``litellm-proxy``
distribution that the package index here does not serve, and two releases of the 1.82 line were
withdrawn after a supply-chain compromise; 1.106.12 is the newest release whose proxy extra
installs from its own dependencies.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from .common import ROOT, Server

VERSION = "1.106.12"
VENV = ROOT / "bench" / ".venv-litellm"
INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 120

#: Environment of the proxy process. Each LITELLM_LOCAL_* makes LiteLLM read a file it ships
#: instead of fetching it from the network at start-up (the model cost map above all: without
#: it, start-up waits on a download that cannot succeed here).
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOG": "ERROR",  # no per-request logging
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
}


class PeerUnavailable(Exception):
    """LiteLLM could not be installed or started here; the message says why."""


def config_yaml(sim_url: str, model: str, upstream_key: str) -> str:
    """One OpenAI-compatible model on the sim; callbacks, logging and spend tracking off."""
    return textwrap.dedent(f"""\
        model_list:
          - model_name: {model}
            litellm_params:
              model: openai/{model}
              api_base: {sim_url}/v1
              api_key: {upstream_key}
        litellm_settings:
          callbacks: []
          success_callback: []
          failure_callback: []
          turn_off_message_logging: true
          set_verbose: false
          request_timeout: 600
        general_settings:
          disable_spend_logs: true
          disable_error_logs: true
        """)


def ensure_installed(log: Path) -> Path:
    """The venv's ``litellm`` executable, installing LiteLLM first if needed."""
    stamp = VENV / f".installed-litellm-{VERSION}"
    executable = VENV / "bin" / "litellm"
    if stamp.exists() and executable.exists():
        return executable
    python = shutil.which("python3.11") or (
        sys.executable if sys.version_info[:2] == (3, 11) else None
    )
    if python is None:
        raise PeerUnavailable("no python3.11 on this machine to create LiteLLM's environment")
    print(f"installing litellm[proxy]=={VERSION} into {VENV} (first run only)…", file=sys.stderr)
    steps = [
        [python, "-m", "venv", str(VENV)],
        [
            str(VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            f"litellm[proxy]=={VERSION}",
        ],
    ]
    with open(log, "w") as out:
        for step in steps:
            try:
                done = subprocess.run(
                    step, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                raise PeerUnavailable(
                    f"installing LiteLLM took more than {INSTALL_TIMEOUT_S} s (see {log})"
                ) from None
            if done.returncode != 0:
                tail = " | ".join(log.read_text().strip().splitlines()[-3:])
                raise PeerUnavailable(f"`{' '.join(step[-3:])}` failed: {tail}")
    if not executable.exists():
        raise PeerUnavailable(f"the install left no {executable}")
    stamp.touch()
    return executable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(tmp: Path, sim_url: str, model: str, upstream_key: str) -> tuple[Server, str]:
    """Start the proxy (one worker) on a free port; returns it and its master key."""
    executable = ensure_installed(tmp / "litellm-install.log")
    config = tmp / "litellm.yaml"
    config.write_text(config_yaml(sim_url, model, upstream_key))
    master_key = "sk-" + secrets.token_hex(32)  # the proxy refuses to start without one
    port = _free_port()
    log = tmp / "litellm.log"
    log_file = open(log, "w")  # handed to the child
    args = [str(executable), "--config", str(config), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--num_workers", "1"]
    env = {**os.environ, **ENV, "LITELLM_MASTER_KEY": master_key}
    env.pop("DATABASE_URL", None)  # no database: no spend tracking, no key table
    proc = subprocess.Popen(
        args,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        env=env,
        text=True,
        start_new_session=True,  # a Ctrl-C reaches the bench only, which stops it
    )
    log_file.close()
    url = f"http://127.0.0.1:{port}"
    server = Server("litellm", proc, url, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise PeerUnavailable(f"the LiteLLM proxy exited at start-up: {tail}")
        try:
            with urllib.request.urlopen(url + "/health/liveliness", timeout=2) as response:
                if response.status == 200:
                    return server, master_key
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise PeerUnavailable(f"the LiteLLM proxy did not answer within {START_TIMEOUT_S} s")
