"""Keeps a gateway's router in step with the engine cores that exist.

Every `REFRESH_S` the gateway asks where the cores are (the controller of its own process, or the Ray cluster's
named actors) and compares with what it streams from: a new core is described (its model's config, tokenizer and
context, so that nothing is loaded here) and polled; a core that is gone, or whose poller found it lost, is
dropped, and found anew once the controller has started it again. A gateway that starts serves as soon as one
replica of a model is described: it loads no model. The listing runs as a DetachedCall: in a cluster whose head
is gone it never returns (the gateway's cluster watch then ends the process).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from garrison.router.replica import CoreLink, ReplicaClient
from garrison.router.router import Deployment, Router
from garrison.serving.cluster_watch import DetachedCall
from garrison_workers.engine_core import CoreInfo
from garrison_workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REFRESH_S = 1.0
LIST_WAIT_S = 5.0  # how long one refresh waits for the listing; a slower one is taken by a later refresh
DESCRIBE_TIMEOUT_S = 3600.0  # a core describes itself once its engine is built: loading a model can take long


class Discovery:
    def __init__(self, router: Router, find: Callable[[], dict[str, CoreLink]], client: str,
                 expected: dict[str, int]) -> None:
        """`find`: the cores by name (may block); `client`: this gateway's name at the cores; `expected`: how many
        replicas each configured model should have."""
        self.router, self.find, self.client, self.expected = router, find, client, expected
        self._replicas: dict[str, ReplicaClient] = {}
        self._describing: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._listing = DetachedCall(lambda: self.find(), "find-cores")  # self.find: replaceable, as in tests

    async def start(self) -> None:
        """Find the cores there are now and wait for them to describe themselves, then keep following."""
        await self.refresh(wait=None)
        if self._describing:
            await asyncio.wait(list(self._describing.values()))
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        for task in (self._task, *self._describing.values()):
            if task is not None:
                task.cancel()
        self._listing.cancel()
        for replica in self._replicas.values():
            await replica.stop()

    async def refresh(self, wait: float | None = LIST_WAIT_S) -> None:
        """Follow the cores the cluster lists, if it answers within `wait` seconds (None: however long)."""
        answered, links = await self._listing.result(wait)
        if not answered or links is None:
            return
        for name, replica in list(self._replicas.items()):
            if name not in links or replica.lost is not None:
                await self._drop(name)
        for name, link in links.items():
            if name not in self._replicas and name not in self._describing:
                self._describing[name] = asyncio.get_running_loop().create_task(self._describe(name, link))

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:  # the cluster is unreachable for a moment: keep what is known
                log.exception("could not list the engine cores; trying again")

    async def _describe(self, name: str, link: CoreLink) -> None:
        try:
            info = await asyncio.wait_for(link.describe(), DESCRIBE_TIMEOUT_S)
        except Exception as err:  # it failed to build its engine, or died: the controller starts it again
            log.warning("engine core %s did not describe itself (%s: %s)", name, type(err).__name__, err)
            return
        finally:
            self._describing.pop(name, None)
        replica = ReplicaClient(link, info, self.client).start()
        self._replicas[name] = replica
        self._deployment(info).replicas.append(replica)
        log.info("serving %s through engine core %s", info.model, name)

    def _deployment(self, info: CoreInfo) -> Deployment:
        deployment = self.router.deployments.get(info.model)
        if deployment is None:
            tokenizer = (Tokenizer.from_files(info.tokenizer_files, Path(info.model))
                         if info.tokenizer_files is not None else None)
            deployment = Deployment(info.model, info.model_config, tokenizer, [], info.max_model_len,
                                    self.expected.get(info.model, 0))
            self.router.deployments[info.model] = deployment
        deployment.max_model_len = min(deployment.max_model_len, info.max_model_len)
        return deployment

    async def _drop(self, name: str) -> None:
        replica = self._replicas.pop(name)
        await replica.stop()
        deployment = self.router.deployments.get(replica.info.model)
        if deployment is not None and replica in deployment.replicas:
            deployment.replicas.remove(replica)
