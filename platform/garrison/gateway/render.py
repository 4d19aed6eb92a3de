"""Chat templates rendered in processes of their own, off the gateway's event loop, within a time and size limit.

A chat template is a program (jinja2, sandboxed) that comes with the model, and its input comes from the client:
rendering it can take unbounded time (`{% for i in range(10**5) %}{% for j in range(10**5) %}` renders nothing for
hours) or memory. On the event loop it would stall every call, health checks included; in a thread it could not be
stopped. So each render runs in one of a few renderer processes: one that passes `timeout_s` is killed and
replaced, its memory is capped (RLIMIT_AS), and its output is cut at `max_chars`. The request then fails with
INVALID_ARGUMENT (the client can send fewer or shorter messages, or a prompt or token ids instead).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import os
import resource
import socket
import subprocess
import sys
from dataclasses import dataclass

from garrison.tenancy.errors import InvalidArgumentError
from garrison_workers.errors import GarrisonError
from garrison_workers.tokenizer import ChatTemplate

log = logging.getLogger(__name__)

RENDER_TIMEOUT_S = 2.0
RENDERER_MEMORY_BYTES = 2 << 30
NUM_RENDERERS = 2
STARTUP_TIMEOUT_S = 60.0


@dataclass(slots=True)
class _Renderer:
    process: subprocess.Popen[bytes]
    conn: multiprocessing.connection.Connection


class ChatRenderer:
    def __init__(self, max_chars: int, timeout_s: float = RENDER_TIMEOUT_S, num_renderers: int = NUM_RENDERERS,
                 memory_bytes: int = RENDERER_MEMORY_BYTES) -> None:
        self.max_chars, self.timeout_s, self.memory_bytes = max_chars, timeout_s, memory_bytes
        self._idle: asyncio.Queue[_Renderer] = asyncio.Queue()
        self._num_renderers = num_renderers

    async def start(self) -> None:
        for renderer in await asyncio.gather(*(asyncio.to_thread(self._spawn) for _ in range(self._num_renderers))):
            self._idle.put_nowait(renderer)

    async def render(self, template: ChatTemplate, messages: list[dict[str, str]]) -> str:
        renderer = await self._idle.get()
        try:
            renderer, answer = await asyncio.to_thread(self._exchange, renderer, template, messages)
        finally:
            self._idle.put_nowait(renderer)
        kind, value = answer
        if kind == "error":
            raise InvalidArgumentError(value)
        return value

    async def stop(self) -> None:
        while not self._idle.empty():
            renderer = self._idle.get_nowait()
            renderer.process.kill()
            renderer.conn.close()

    def _exchange(self, renderer: _Renderer, template: ChatTemplate, messages: list[dict[str, str]]
                  ) -> tuple[_Renderer, tuple[str, str]]:
        """Render in `renderer`; a renderer that overruns or dies is replaced (the returned one is the live one)."""
        try:
            renderer.conn.send((template, messages, self.max_chars))
            if renderer.conn.poll(self.timeout_s):
                return renderer, renderer.conn.recv()
            why = (f"the model's chat template took longer than {self.timeout_s:g} s to render these messages; "
                   "send fewer or shorter messages, or a prompt instead")
        except (EOFError, OSError):  # it died: out of memory, most likely
            why = "rendering the model's chat template for these messages ran out of memory; send shorter messages"
        log.warning("replacing a chat template renderer: %s", why)
        renderer.process.kill()
        renderer.process.wait()
        renderer.conn.close()
        return self._spawn(), ("error", why)

    def _spawn(self) -> _Renderer:
        # A fresh interpreter, not a fork of this process (it runs gRPC's and Ray's threads) nor multiprocessing's
        # spawn (which re-imports the caller's __main__).
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), str(self.memory_bytes)],
                                   pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        conn = multiprocessing.connection.Connection(ours.detach())
        if not conn.poll(STARTUP_TIMEOUT_S):  # a render's time limit must not count the process's start
            process.kill()
            raise GarrisonError(f"a chat template renderer did not start within {STARTUP_TIMEOUT_S:g} s")
        conn.recv()
        return _Renderer(process, conn)


def _serve(conn: multiprocessing.connection.Connection, memory_bytes: int) -> None:
    """A renderer process: render what arrives until the pipe closes."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    conn.send("ready")
    while True:
        try:
            template, messages, max_chars = conn.recv()
        except EOFError:
            return
        try:
            answer = ("ok", template.render(messages, add_generation_prompt=True, max_chars=max_chars))
        except GarrisonError as err:
            answer = ("error", str(err))
        except MemoryError:
            answer = ("error", "rendering the model's chat template for these messages ran out of memory; "
                               "send shorter messages")
        except Exception as err:  # the template's own fault (a sandbox violation, a type error in it)
            answer = ("error", f"the model's chat template failed on these messages ({type(err).__name__}: {err})")
        conn.send(answer)


if __name__ == "__main__":
    _serve(multiprocessing.connection.Connection(int(sys.argv[1])), int(sys.argv[2]))
