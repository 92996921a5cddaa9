"""Log set-up: one line per significant event, as text or JSON (for log pipelines)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

#: The route whose task logs (``rnnd serve`` with routes): set by the router before it starts a
#: route's daemon, so every task that daemon creates inherits it (asyncio copies the context).
ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("rnnd_route", default="")


class RouteFilter(logging.Filter):
    """Puts ``route`` on every record: "route NAME " in text (empty outside routes), a field in JSON."""

    def filter(self, record: logging.LogRecord) -> bool:
        route = ROUTE.get()
        record.route = route
        record.route_prefix = f"route {route} " if route else ""
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc: dict[str, str | int] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                                     "msg": record.getMessage()}
        if self.worker is not None:
            doc["worker"] = self.worker
        route = getattr(record, "route", "")
        if route:
            doc["route"] = route
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(fmt: str = "text", level: str = "info", worker: int | None = None) -> None:
    """``worker``: the number of a worker of ``rnnd serve --workers N``. The workers write to the
    supervisor's stdout and stderr, interleaved, so each line says whose it is."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = "" if worker is None else f"worker {worker} "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {who}%(route_prefix)s%(name)s: "
                                               "%(message)s"))
    handler.addFilter(RouteFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every connection error at ERROR while it retries; ours says it once, with the
    # broker's reason when it refused the login (kept by the quirks module's handler).
    from .kafka.quirks import watch_login_refusals

    aiokafka = logging.getLogger("aiokafka")
    aiokafka.setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
    aiokafka.propagate = level == "debug"
    watch_login_refusals()
