"""A real uvicorn server on a free loopback port, in a thread, for the serve tests (the `openai`
client and raw httpx talk to it over HTTP, as users' clients do)."""

from __future__ import annotations

import socket
import threading
import time
import uvicorn

from autodeploy import LLM

from runtime_helpers import smollm2_cpu_base, with_cache


def smollm2_llm(model_dir, num_blocks: int = 32, **settings) -> LLM:
    """SmolLM2 float32 on the CPU with a small cache (max_seq_len 96 unless given)."""
    return LLM.from_optimized(with_cache(smollm2_cpu_base(model_dir), num_blocks=num_blocks, block_size=16),
                              **{"max_batch_size": 4, "max_seq_len": 96, **settings})


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> until `stop()`."""

    def __init__(self, app, drain_timeout: float = 5.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=drain_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> float:
        """Ask it to exit (what SIGTERM does) and wait; the seconds it took."""
        start = time.monotonic()
        self.server.should_exit = True
        self.thread.join(timeout)
        return time.monotonic() - start
