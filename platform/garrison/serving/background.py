"""Run a GarrisonServer on a thread of its own (tests, benchmarks, embedding in another program)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from garrison.serving.config import ServeConfig
from garrison.serving.server import GarrisonServer


class BackgroundServer:
    def __init__(self, config: ServeConfig, **server_kwargs: Any) -> None:
        self.server = GarrisonServer(config, **server_kwargs)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="garrison-server", daemon=True)

    @property
    def address(self) -> str:
        host = self.server.config.listen.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self.server.port}"

    def start(self, timeout: float = 600.0) -> "BackgroundServer":
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, coroutine: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, grace: float = 2.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop(grace), timeout=120)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as err:  # reported to the thread that called start()
            self._error = err
            self._started.set()
            self._loop.run_until_complete(self.server.stop(0))
            return
        self._started.set()
        self._loop.run_forever()
