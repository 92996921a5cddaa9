"""``rnnd serve --workers N``: N daemon processes on one machine, one consumer group, one HTTP endpoint.

Why processes: one daemon is one event loop plus one model thread, and its intake (decode,
batch, encode) holds the GIL, so one process uses about one core however many the machine
has. N ordinary ``rnnd serve`` processes in one consumer group share the input topic's
partitions by Kafka's group protocol, exactly as N replicas on N machines would: state,
offsets, delivery and rebalances are what they are for replicas, nothing new. What this
module adds is only what one machine's operator expects of one service: one endpoint to
scrape and probe, one signal to stop it, one exit code.

The supervisor loads no model and joins no group; it starts the workers, answers HTTP for
them, and turns their fate into its own:

* **One endpoint.** ``/metrics`` is every worker's ``/metrics``, scraped when asked, with a
  ``worker`` label on each sample (a panel sums them, or splits by worker); ``/healthz`` is
  200 while every worker runs; ``/readyz`` 200 only when every worker answers ready, because
  a worker that is not ready holds partitions nobody serves. With ``admin_address``, POST
  /admin/reload is forwarded to every worker's own admin endpoint (on loopback), and the
  answer lists each worker's outcome.
* **A worker that exits unasked stops them all**, and the supervisor exits with that worker's
  code. Carrying on with N-1 workers would be running degraded without a word: the dead
  worker's partitions move to the others (a rebalance), its share of the machine is lost, and
  nothing outside would notice. An orchestrator that sees the pod exit restarts it whole,
  which is the recovery every other failure of `rnnd serve` already relies on.
* **Shutdown** forwards SIGTERM to every worker and waits as long as one worker's own
  shutdown budgets allow (budgets.py), then SIGKILLs what is left: a worker is never cut
  short before its own budgets would have cut it.
* **The workers die with the supervisor**, even by SIGKILL (Linux's parent-death signal):
  orphans would keep serving partitions and ports that a restarted supervisor then fights.

Each worker gets the supervisor's resolved settings (see :func:`worker_env`), so all derive the
same consumer group (``rnnd-<model name>`` unless ``group_id`` is set) and changelog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from .. import settings
from ..children import free_port, parent_death_signal
from ..config import ServeConfig
from ..metrics import NOT_FOUND, Answer, Endpoint, combined_answer, misdirected, start_endpoints
from ..metrics import combine as metrics_combine
from ..settings import ENV_NOT_SETTINGS, ENV_PREFIX, WORKER_ENV
from .budgets import ADMIN_ANSWER_S, CLIENT_STOP_S, DRAIN_S, FINAL_CHECKPOINT_S

log = logging.getLogger("rnnd.workers")

#: How long one worker may take to stop after SIGTERM: its drain, final checkpoint and client
#: stops (budgets.py), plus a little for the interpreter to exit. Waiting less would SIGKILL a
#: worker its own budgets would still let finish; waiting longer would wait for nothing.
STOP_WAIT_S = DRAIN_S + FINAL_CHECKPOINT_S + 2 * CLIENT_STOP_S + 5.0
#: A worker that does not answer a scrape or a probe in this long counts as not answering:
#: shorter than Prometheus' default scrape timeout (10 s) and Kubernetes' probe periods.
ASK_TIMEOUT_S = 3.0
#: How often the supervisor asks the workers whether they are ready until all of them are
#: (to say so once, and then to check the partition count against the workers).
READY_POLL_S = 0.5


def supervise(cfg: ServeConfig, debug: bool = False) -> int:
    """Run ``cfg.workers`` workers until SIGTERM/SIGINT or until one exits; the exit code for the CLI."""
    return asyncio.run(Supervisor(cfg, debug).run())


def worker_env(cfg: ServeConfig, index: int, port: int, environ: Mapping[str, str],
               admin_port: int = 0) -> dict[str, str]:
    """The environment of worker ``index``: ``environ`` without rnnd's settings, plus the resolved ones.

    Through the environment rather than flags, because flags show in ``ps`` to every user of
    the machine and the settings may hold a password. Resolved values rather than the parent's
    sources (its flags, variables and config file): each worker then runs with exactly the
    settings the supervisor checked, whatever happens to the file meanwhile. Only values that
    differ from the default are set: nothing else is left for a worker to read them from.
    Each worker serves its HTTP on loopback only (the supervisor scrapes it; nobody else should),
    and so its admin endpoint, at ``admin_port``, when there is one (the supervisor's forwards to it).
    """
    env = {k: v for k, v in environ.items()
           if not k.startswith(ENV_PREFIX) or (k in ENV_NOT_SETTINGS and k != f"{ENV_PREFIX}CONFIG")}
    own = settings.replace(cfg, workers=1, http_host="127.0.0.1", http_port=port,
                           admin_address=f"127.0.0.1:{admin_port}" if cfg.admin_address else "")
    for s in settings.of(ServeConfig):
        v = settings.value(own, s)
        if v != s.default:
            env[s.env] = ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) \
                else str(v)
    env[WORKER_ENV] = str(index)
    return env


def combine(expositions: Iterable[tuple[int, str]]) -> bytes:
    """The workers' expositions as one: every sample labelled ``worker="<index>"``, HELP/TYPE once per family."""
    return metrics_combine(((str(i), text_string_to_metric_families(text)) for i, text in expositions), "worker")


def exit_code(returncode: int) -> int:
    """A process's exit as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def fate(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with {exit_code(returncode)}"


@dataclass
class Worker:
    index: int
    port: int
    proc: asyncio.subprocess.Process
    admin_port: int = 0

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def ask(self, path: str, method: str = "GET", admin: bool = False,
                  timeout: float = ASK_TIMEOUT_S) -> tuple[int, bytes]:
        """``method path`` of the worker's HTTP (``admin``: of its admin endpoint): (status, body), (0, b"")
        when it does not answer."""
        writer = None
        try:
            port = self.admin_port if admin else self.port
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), ASK_TIMEOUT_S)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), timeout)  # the worker closes after one answer
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), body
        except (OSError, TimeoutError, ValueError, IndexError):
            return 0, b""
        finally:
            if writer is not None:
                writer.close()


class Supervisor:
    def __init__(self, cfg: ServeConfig, debug: bool = False) -> None:
        self.cfg = cfg
        self.debug = debug
        self.workers: list[Worker] = []
        self._stop = asyncio.Event()

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        http = Endpoint(cfg.http_host, cfg.http_port, self.answer)
        admin = Endpoint(*cfg.admin_endpoint, self.reload) if cfg.admin_endpoint else None
        # before any worker starts: nothing to undo
        if not await start_endpoints([(http, "/metrics", "http_port or http_host"),
                                      (admin, "/admin/reload", "admin_address")]):
            return 2
        port = http.port
        watch = None
        try:
            if admin is not None:
                log.info("admin endpoint: POST http://%s:%d/admin/reload (forwarded to every worker)", admin.host,
                         admin.port)
            await self._start()
            log.info("%d workers of rnnd serve on %s, one consumer group: %s | http://%s:%d/metrics for all",
                     len(self.workers), cfg.input_topic,
                     ", ".join(f"worker {w.index} pid {w.proc.pid} port {w.port}" for w in self.workers),
                     cfg.http_host, port)
            watch = asyncio.create_task(self._watch_ready())
            exits = {asyncio.create_task(w.proc.wait()): w for w in self.workers}
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*exits, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if stop in done:
                log.info("stopping: SIGTERM to %d workers, waiting up to %.0fs", len(self.workers), STOP_WAIT_S)
                return await self._stop_all()
            dead = min((exits[t] for t in done), key=lambda w: w.index)
            code = exit_code(dead.proc.returncode or 0)
            log.error("worker %d (pid %d) %s unasked: stopping the other workers; exiting %d (restart the whole "
                      "service rather than run with fewer workers)", dead.index, dead.proc.pid,
                      fate(dead.proc.returncode or 0), code)
            await self._stop_all(reported=dead)
            return code
        finally:
            if watch is not None:
                watch.cancel()
            for w in self.workers:  # only after an error of the supervisor itself: never leave one behind
                if w.alive:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                    await w.proc.wait()
            await http.stop()
            if admin is not None:
                await admin.stop()

    async def _start(self) -> None:
        argv = [sys.executable, "-m", "rnnd", "serve", *(["--debug"] if self.debug else [])]
        for i in range(self.cfg.workers):
            port, admin_port = free_port(), free_port() if self.cfg.admin_address else 0
            env = worker_env(self.cfg, i, port, os.environ, admin_port)
            proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                        preexec_fn=parent_death_signal())
            self.workers.append(Worker(i, port, proc, admin_port))

    async def _stop_all(self, reported: Worker | None = None) -> int:
        """SIGTERM to every worker, each waited for up to STOP_WAIT_S: 0 if all exited 0, else the first other code.

        ``reported``: a worker whose exit is already logged."""
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(w.proc.wait()) for w in self.workers]
        _, late = await asyncio.wait(waits, timeout=STOP_WAIT_S)
        for w in self.workers:
            if w.alive:
                log.error("worker %d (pid %d) did not stop within %.0fs: killing it", w.index, w.proc.pid,
                          STOP_WAIT_S)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
        await asyncio.gather(*late)
        codes = [exit_code(w.proc.returncode or 0) for w in self.workers]
        failed = [(w, c) for w, c in zip(self.workers, codes, strict=True) if c]
        for w, _ in failed:
            if w is not reported:
                log.warning("worker %d (pid %d) %s", w.index, w.proc.pid, fate(w.proc.returncode or 0))
        return failed[0][1] if failed else 0

    async def _watch_ready(self) -> None:
        """Once every worker is ready: say so, and warn when there are more workers than partitions."""
        while not all(await asyncio.gather(*(self._ready(w) for w in self.workers))):
            await asyncio.sleep(READY_POLL_S)
        log.info("all %d workers ready", len(self.workers))
        partitions = await self._partitions()
        if partitions is not None and partitions < len(self.workers):
            idle = len(self.workers) - partitions
            log.warning("input topic %r has %d partition(s) for %d workers: %d worker(s) get none and idle "
                        "(rnnd_assigned_partitions is 0 on them); use at most %d workers, or more partitions",
                        self.cfg.input_topic, partitions, len(self.workers), idle, partitions)

    async def _partitions(self) -> int | None:
        """The input topic's partition count, asked of the brokers (None if they do not say)."""
        from aiokafka.errors import KafkaError

        from .. import kafka

        cfg = self.cfg
        client = kafka.admin(kafka.client_settings(cfg), f"{cfg.client_id}-admin")
        try:
            await asyncio.wait_for(client.start(), ASK_TIMEOUT_S * 5)
            found = await asyncio.wait_for(kafka.topic_partitions(client), ASK_TIMEOUT_S * 5)
            return len(found[cfg.input_topic]) if cfg.input_topic in found else None
        except (KafkaError, OSError, TimeoutError) as e:
            log.debug("partition count of %s not known (%r): not compared with the workers", cfg.input_topic, e)
            return None
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _ready(self, w: Worker) -> bool:
        return w.alive and (await w.ask("/readyz"))[0] == 200

    async def _metrics(self) -> bytes:
        answers = await asyncio.gather(*(w.ask("/metrics") for w in self.workers))
        return combine((w.index, body.decode()) for w, (status, body) in zip(self.workers, answers, strict=True)
                       if status == 200)

    async def answer(self, path: str, method: str = "GET") -> Answer:
        """The paths of metrics.HttpServer, answered for all workers."""
        if path == "/metrics":
            return 200, await self._metrics(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            ok = bool(self.workers) and all(w.alive for w in self.workers)
            return (200, b"ok\n", "text/plain") if ok else (503, b"a worker is not running\n", "text/plain")
        if path == "/readyz":
            ok = bool(self.workers) and all(await asyncio.gather(*(self._ready(w) for w in self.workers)))
            return (200, b"ready\n", "text/plain") if ok else (503, b"not ready\n", "text/plain")
        return NOT_FOUND


    async def reload(self, path: str, method: str) -> Answer:
        """POST /admin/reload of every worker at once; the answer lists theirs, its status is the worst one's.

        Each worker swaps at its own checkpoint: for a moment some serve the new bundle while
        others serve the old one, as replicas on several machines would, and each output names
        the bundle that made it."""
        refused = misdirected(path, method)
        if refused is not None:
            return refused
        answers = await asyncio.gather(*(w.ask(path, "POST", admin=True, timeout=ADMIN_ANSWER_S + ASK_TIMEOUT_S)
                                         for w in self.workers))
        docs = []
        for w, (status, body) in zip(self.workers, answers, strict=True):
            try:
                doc = orjson.loads(body) if status else {"result": "no answer"}
            except orjson.JSONDecodeError:
                doc = {"result": "no answer"}
            docs.append({"worker": w.index, "status": status or 503, **doc})
        return combined_answer("workers", docs)
