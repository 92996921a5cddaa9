"""Several routes in one ``rnnd serve``: each an input topic served by its own bundle, in one process.

A config file's ``[routes.NAME]`` tables (``config.load_routes``) each become a whole
``Daemon``: its own bundle, consumer group (``rnnd-NAME`` unless set), changelog, state,
output and dead-letter topics, checkpoints and hot reload. They share the event loop, the
process's settings (the file's top level: brokers, security, HTTP) and one endpoint:

* ``/metrics``: every route's metrics with a ``route`` label; the process's own (memory,
  CPU, GC pauses, event-loop lag: one loop serves every route) once, unlabelled; and
  ``rnnd_route_up{route,shadow}``;
* ``/readyz``: 200 when every route that is not a shadow is ready; ``/healthz``: 200 while
  every such route runs;
* the admin endpoint: ``POST /admin/reload`` reloads every route (each from its own model
  path, each at its own checkpoint), ``POST /admin/reload/NAME`` one; the answer lists each.

A **shadow** route (``shadow = true``) runs a second bundle on another route's input topic and
writes to its own output topic: a candidate model watched on real traffic before it serves.
Its own group reads the input at its own pace, so it never holds the served route back, and
nothing that happens to it stops the others: a shadow that cannot start (a missing bundle) or
that stops (a changelog it cannot use) is logged and shown as ``rnnd_route_up 0``, and the
served routes go on. A route that is not a shadow stopping unasked stops them all, and the
process exits with its code, as one daemon would: running on without it would leave its
partitions unserved with nothing outside to notice.

SIGTERM/SIGINT stops every route as one daemon stops (each drains and commits), at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping

from prometheus_client import Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..config import ServeConfig
from ..errors import RnndError
from ..logs import ROUTE
from ..metrics import Answer, Endpoint, Metrics, combine, combined_answer, misdirected, start_endpoints
from .daemon import Daemon
from .housekeeping import LoopWatch
from .reload import answered

log = logging.getLogger("rnnd.routes")

#: The metrics of the process rather than of a route: the router's, unlabelled (a route's copy is empty).
PROCESS_FAMILIES = frozenset({"rnnd_gc_pause_seconds", "rnnd_event_loop_lag_seconds",
                              "rnnd_event_loop_lag_max_seconds"})


class Router:
    """The routes' daemons, their endpoint, and what one route's fate does to the others (module docstring)."""

    def __init__(self, routes: Mapping[str, ServeConfig]) -> None:
        self.configs = dict(routes)
        self.base = next(iter(routes.values()))  # the process's settings: the same in every route
        # What belongs to the process, not to a route (memory, CPU, GC pauses, event-loop lag), measured
        # once here and shown unlabelled; the routes' own metrics carry their route label.
        self.process = Metrics()
        self.loop_watch = LoopWatch(self.process)
        self.up = Gauge("rnnd_route_up", "1 while the route serves; a shadow that could not start or stopped: 0.",
                        ["route", "shadow"], registry=self.process.registry)
        self.daemons: dict[str, Daemon] = {}
        self.running: set[str] = set()
        for name, cfg in routes.items():
            self.up.labels(name, str(cfg.shadow).lower()).set(0)
            token = ROUTE.set(name)
            try:
                self.daemons[name] = Daemon(cfg, Metrics(process=False), endpoints=False)
            except RnndError as e:
                if not cfg.shadow:
                    raise
                log.error("shadow route %s NOT STARTED, the other routes go on: %s", name, e)
            finally:
                ROUTE.reset(token)
        self._stop = asyncio.Event()

    async def run(self) -> int:
        base = self.base
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        http = Endpoint(base.http_host, base.http_port, self.answer)
        admin = Endpoint(*base.admin_endpoint, self.reload) if base.admin_endpoint else None
        try:
            if not await start_endpoints([(http, "/metrics", "http_port or http_host"),
                                          (admin, "/admin/reload", "admin_address")]):
                return 2
            log.info("%d routes in one process: %s | http://%s:%d/metrics for all%s", len(self.configs),
                     ", ".join(f"{n} ({c.input_topic} → {c.output_topic}{', shadow' if c.shadow else ''})"
                               for n, c in self.configs.items()), base.http_host, http.port,
                     f" | POST http://{admin.host}:{admin.port}/admin/reload[/NAME]" if admin else "")
            return await self._serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await http.stop()
            if admin is not None:
                await admin.stop()

    async def _serve(self) -> int:
        self.process.watch_gc()
        watch = asyncio.create_task(self.loop_watch.run())
        try:
            return await self._serve_routes()
        finally:
            watch.cancel()
            self.process.unwatch_gc()

    async def _serve_routes(self) -> int:
        runs: dict[asyncio.Task, str] = {}
        for name, daemon in self.daemons.items():
            token = ROUTE.set(name)  # the daemon's tasks inherit it: their log lines name the route
            try:
                runs[asyncio.create_task(daemon.run(install_signals=False), name=f"route-{name}")] = name
            finally:
                ROUTE.reset(token)
            self.up.labels(name, str(daemon.cfg.shadow).lower()).set(1)
            self.running.add(name)
        stop = asyncio.create_task(self._stop.wait())
        code = 0
        pending = set(runs)
        while pending:
            done, _ = await asyncio.wait([*pending, stop], return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                break
            for task in done:
                pending.discard(task)
                name = runs[task]
                daemon = self.daemons[name]
                self.up.labels(name, str(daemon.cfg.shadow).lower()).set(0)
                self.running.discard(name)
                exc = task.exception()
                result = 1 if exc is not None else task.result()
                if daemon.cfg.shadow:
                    log.error("shadow route %s STOPPED (exit %d%s); the other routes go on", name, result,
                              f": {exc!r}" if exc else "")
                    continue
                log.error("route %s stopped unasked (exit %d%s): stopping every route", name, result,
                          f": {exc!r}" if exc else "")
                code = code or result or 1
                self._stop.set()
        stop.cancel()
        log.info("stopping %d route(s)", len(pending))
        for task in pending:
            token = ROUTE.set(runs[task])
            self.daemons[runs[task]].stop()
            ROUTE.reset(token)
        for task, name in runs.items():
            with contextlib.suppress(Exception):
                result = await task
                if result and not code and not self.daemons[name].cfg.shadow:
                    code = result
        return code

    # --- the endpoint ---------------------------------------------------------------------------
    def served(self) -> list[Daemon]:
        return [d for d in self.daemons.values() if not d.cfg.shadow]

    async def answer(self, path: str, method: str = "GET") -> Answer:
        if path == "/metrics":
            parts = [(name, [f for f in d.metrics.registry.collect() if f.name not in PROCESS_FAMILIES])
                     for name, d in self.daemons.items()]
            own = [f for f in self.process.registry.collect() if f.name in PROCESS_FAMILIES or f.name == "rnnd_route_up"
                   or f.name.startswith(("process_", "python_"))]
            return 200, combine(parts, "route", own), CONTENT_TYPE_LATEST
        if path == "/healthz":
            ok = all(n in self.running for n, d in self.daemons.items() if not d.cfg.shadow)
            return (200, b"ok\n", "text/plain") if ok else (503, b"a route is not running\n", "text/plain")
        if path == "/readyz":
            ok = all(d.is_ready() for d in self.served())
            return (200, b"ready\n", "text/plain") if ok else (503, b"not ready\n", "text/plain")
        return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"

    async def reload(self, path: str, method: str) -> Answer:
        """POST /admin/reload (every route) or /admin/reload/NAME (one): each route's outcome."""
        refused = misdirected(path, method, named=True)
        if refused is not None:
            return refused
        name = path.removeprefix("/admin/reload").strip("/")
        if name and name not in self.daemons:
            return 404, f"no route {name!r}: {', '.join(self.daemons)}\n".encode(), "text/plain"
        chosen = [name] if name else list(self.daemons)
        outcomes = await asyncio.gather(*(answered(self.daemons[n].reloader, n) for n in chosen))
        return combined_answer("routes", [{"route": n, "status": o.status, "result": o.result, "serving": o.serving,
                                    "message": o.message} for n, o in zip(chosen, outcomes, strict=True)])
