"""Hot reload: a new bundle at the model path (or asked for on the admin endpoint) swapped in while serving.

No restart and no rebalance: the daemon keeps its group membership, its partitions, every
stream's state and its queued steps; only what is made from the bundle changes
(``Pipeline.swap``). In order (``Reloader.reload``):

1. load the bundle at ``model`` on a worker thread (the event loop keeps serving): its content
   hash is checked as it is read, and its provider verified, as at start (``open_bundle``);
2. its self-check: the probe stored at export re-run here, within the bundle's own tolerance;
3. nothing to do if its content hash is the serving bundle's;
4. ``upgrade.upgrade``: continue every stream, reset them all (``on_state_mismatch=reset``), or
   refuse it (another input; another state layout under the other policies);
5. the serve settings checked against it (``pipeline.check_config``: a seq2seq bundle's
   ``max_output_len``, ...);
6. swapped in at a checkpoint boundary: a checkpoint that holds the model calls from its
   snapshot to its commit and swaps once everything before it is committed (checkpoint.py,
   step 7), so each step is applied, committed and replayed by one bundle only. While a
   checkpoint does not commit (a broker outage) the swap waits for the next. A seq2seq
   bundle's answers in flight finish on the old bundle first;
7. reported: ``rnnd_model_info`` names the new bundle (the old series is removed),
   ``rnnd_model_reloads_total{result}`` counts, and a log line says what serves now and what
   became of the streams. Every output already names the bundle that made it (``model``).

A refusal at any step leaves the serving bundle serving, and the log line (and the admin
answer) says why. One reload runs at a time; a request during one waits for it, then loads
what is at the path by then.

What is reloaded is always the file at ``model``, never a path given in a request: a restart
then serves what the running daemon serves.

The watch (``watch_model``): every ``WATCH_POLL_S`` the path's identity (device, inode, size,
modification time) is read, following symlinks (a Kubernetes volume swaps one). A change is
loaded once the identity has held still for one more poll, so a file copied in place is not
read while half-written; a rename is atomic and better. A half-written file fails its content
hash and is refused; the complete one is loaded when it settles. A refused file is not tried
again until it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import NamedTuple

import orjson
from aiokafka.errors import KafkaError

from ..config import ServeConfig
from ..errors import RnndError
from ..logs import ROUTE
from ..metrics import Answer, HttpEndpoint, Metrics, misdirected
from ..pipeline import Pipeline, check_config
from ..runtime import BundleModel, ProviderChoice, open_served
from ..upgrade import upgrade
from .budgets import ADMIN_ANSWER_S, RELOAD_RETRY_S, WATCH_POLL_S
from .checkpoint import Checkpointer
from .models import report_model, retire_model

log = logging.getLogger("rnnd.daemon")

#: A file's identity as the watch sees it (``os.stat``): device, inode, size, mtime in ns.
Identity = tuple[int, int, int, int]


class Outcome(NamedTuple):
    """How a reload went: ``result`` (swapped, unchanged, refused; "waiting" for an admin answer that
    could not wait longer), what serves now, why, and the admin answer's HTTP status (409: refused
    as incompatible, 422: not a usable bundle, 202: waiting)."""

    result: str
    serving: str
    message: str
    status: int = 200

    def document(self) -> bytes:
        return orjson.dumps({"result": self.result, "serving": self.serving, "message": self.message},
                            option=orjson.OPT_APPEND_NEWLINE)


def identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Reloader:
    """The steps of the module docstring, and the watch that starts them."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, checkpointer: Checkpointer,
                 provider: ProviderChoice, stopping: asyncio.Event) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.provider = provider  # of the serving bundle
        self.stopping = stopping
        self.seen = identity(cfg.model)  # the file last loaded (or refused): the watch waits for another
        self._one = asyncio.Lock()
        for result in ("swapped", "unchanged", "refused"):
            metrics.reloads.labels(result)  # series at 0 from the start

    async def watch(self) -> None:
        """``watch_model``: reload when the file at ``model`` changed and has held still for a poll."""
        path = self.cfg.model
        settling: Identity | None = None
        while True:
            await asyncio.sleep(WATCH_POLL_S)
            now = identity(path)
            if now is None or now == self.seen:
                settling = None
                continue
            if now != settling:  # changed: read it once it holds still
                settling = now
                continue
            settling = None
            await self.reload("a new file at the model path")

    async def reload(self, trigger: str) -> Outcome:
        async with self._one:
            outcome = await self._reload(trigger)
        self.metrics.reloads.labels(outcome.result).inc()
        if outcome.result == "refused":
            log.error("reload (%s) REFUSED, %s keeps serving: %s", trigger, outcome.serving, outcome.message)
        elif outcome.result == "unchanged":
            log.info("reload (%s): %s", trigger, outcome.message)
        return outcome

    async def _reload(self, trigger: str) -> Outcome:
        cfg, pipeline = self.cfg, self.pipeline
        serving = pipeline.model
        self.seen = identity(cfg.model)  # read before the file is: a later change is another reload
        log.info("reload (%s): loading %s", trigger, cfg.model)
        try:  # 1. load, content hash and provider checked
            model, provider = await asyncio.to_thread(open_served, cfg.model, cfg)
            check = model.spec.self_check
            if check is None:
                return self._refused(serving, f"{cfg.model} has no self-check to prove it runs correctly here: "
                                              "export it with this rnnd's `rnnd export`", 422)
            err = await asyncio.to_thread(model.self_check)  # 2. self-check
        except RnndError as e:
            return self._refused(serving, str(e), 422)
        except Exception as e:  # whatever a bad file makes ONNX Runtime raise: refused, never fatal
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return self._refused(serving, f"{cfg.model} could not be run: {first}", 422)
        if not err <= check.tolerance:
            return self._refused(serving, f"{model.spec.model.ref} failed its self-check here: max |error| {err:.3g} "
                                          f"against PyTorch's outputs, tolerance {check.tolerance:g}", 422)
        if model.spec.content_hash == serving.spec.content_hash:  # 3.
            return Outcome("unchanged", serving.spec.model.ref, f"{cfg.model} is the bundle serving: nothing to do")
        plan = upgrade(serving.spec, model.spec, cfg)  # 4.
        if plan.action == "refuse":
            return self._refused(serving, f"{model.spec.model.ref}: {plan.why}", 409)
        try:
            check_config(model, cfg)  # 5.
        except RnndError as e:
            return self._refused(serving, f"{model.spec.model.ref}: {e}", 409)
        if model.spec.model.ref == serving.spec.model.ref:
            log.warning("reload: %s has the name and version of the bundle serving but other content: its outputs "
                        "cannot be told apart by their \"model\" field; give each export its own version",
                        model.spec.model.ref)
        if not await self._swap(model, plan.action == "reset"):  # 6.
            return self._refused(serving, "the daemon stopped before a checkpoint let the new bundle in", 503)
        retire_model(self.metrics, serving, self.provider)  # 7.
        report_model(self.metrics, model, provider)
        self.provider = provider
        log.warning("now serving %s (was %s; %s, on %s): %s", model.spec.model.ref, serving.spec.model.ref, trigger,
                    provider.actual, plan.why)
        return Outcome("swapped", model.spec.model.ref,
                       f"{model.spec.model.ref} serves (was {serving.spec.model.ref}): {plan.why}")

    async def _swap(self, model: BundleModel, reset: bool) -> bool:
        """Step 6: at a checkpoint that commits everything before it; False if the daemon stopped first."""
        pipeline = self.pipeline
        while not self.stopping.is_set():
            try:
                if await self.checkpointer.checkpoint(boundary=lambda: pipeline.swap(model, reset)):
                    break
            except (KafkaError, OSError) as e:
                log.warning("reload: checkpoint failed (%s: %s); the swap waits for the next", type(e).__name__, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), RELOAD_RETRY_S)
        while pipeline.model is not model:  # seq2seq: its answers in flight finish first
            if self.stopping.is_set():
                return False
            await asyncio.sleep(0.01)
        return True

    def _refused(self, serving: BundleModel, why: str, status: int) -> Outcome:
        return Outcome("refused", serving.spec.model.ref, why, status)


async def answered(reloader: Reloader, route: str = "") -> Outcome:
    """A reload for the admin endpoint: its outcome, or "waiting" (202) after ``ADMIN_ANSWER_S``.

    Shielded: an answer that times out leaves the reload running, not cut short mid-swap.
    ``route``: the route whose reload this is (its log lines name it)."""
    token = ROUTE.set(route) if route else None
    try:
        reload = asyncio.ensure_future(reloader.reload("POST /admin/reload"))
    finally:
        if token is not None:
            ROUTE.reset(token)
    try:
        return await asyncio.wait_for(asyncio.shield(reload), ADMIN_ANSWER_S)
    except TimeoutError:
        return Outcome("waiting", reloader.pipeline.model_ref,
                       f"not done within {ADMIN_ANSWER_S:.0f}s (waiting for a checkpoint that commits?): it goes on; "
                       "rnnd_model_info says when it serves", 202)


class AdminServer(HttpEndpoint):
    """The admin endpoint (``admin_address``): POST /admin/reload, answered with the reload's outcome as JSON.

    Apart from /metrics, which faces the cluster: whoever reaches this one changes what the
    daemon serves.
    """

    def __init__(self, reloader: Reloader, host: str, port: int) -> None:
        super().__init__(host, port)
        self.reloader = reloader

    async def answer(self, path: str, method: str = "GET") -> Answer:
        refused = misdirected(path, method)
        if refused is not None:
            return refused
        outcome = await answered(self.reloader)
        return outcome.status, outcome.document(), "application/json"
