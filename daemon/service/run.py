"""``rnnd serve``'s process: the garbage collector's settings, the event loop, one daemon until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Mapping

from ..config import ServeConfig
from ..errors import ConfigError
from .daemon import Daemon

log = logging.getLogger("rnnd.daemon")


def serve(cfg: ServeConfig, routes: Mapping[str, ServeConfig] | None = None) -> int:
    """Run the daemon (``routes``: every route of a config file, in one process; ``cfg`` is then any of
    them, for the process's settings) until SIGTERM/SIGINT; the exit code for the CLI."""
    if cfg.gc_threshold:
        # Every message allocates a few container objects that live until their checkpoint, so at
        # Python's default of 700 the collector runs every few hundred messages and its older
        # generations keep re-scanning the queued records. Process-wide, hence here and not in Daemon.
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(cfg.gc_threshold, gen1, gen2)
    loop_factory = _loop_factory(cfg.event_loop)
    log.info("event loop: %s", "uvloop" if loop_factory else "asyncio")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve_routes(routes) if routes else _serve(cfg))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop runs the same asyncio code with its loop, sockets and timers in C. Offered because it is
    the usual first thing to try; on our benchmark it was within noise of the standard loop (Kafka
    traffic is few, large reads and writes). None: the standard loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError("event_loop=uvloop but uvloop is not installed: pip install 'rnnd[uvloop]', or use "
                          "event_loop=asyncio") from None
    return uvloop.new_event_loop


async def _serve(cfg: ServeConfig) -> int:
    daemon = Daemon(cfg)
    gc.freeze()  # the model, its session and the imports live as long as the process: never scan them again
    code = await daemon.run()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stopped: a late second signal changes nothing now
        signal.signal(sig, signal.SIG_IGN)
    return code


async def _serve_routes(routes: Mapping[str, ServeConfig]) -> int:
    from .routes import Router

    router = Router(routes)
    gc.freeze()
    code = await router.run()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return code
