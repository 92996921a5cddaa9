"""Real daemon processes and real topics for the end-to-end tests.

``DaemonProcess`` runs ``python -m rnnd serve`` exactly as an operator would (its own
process, signals, HTTP endpoint); ``produce``/``consume`` talk to the broker with aiokafka.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    def __init__(self, bundle: Path, bootstrap: str, input_topic: str, output_topic: str, *extra: str,
                 group: str | None = None, log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "rnnd", "serve", "--model", str(bundle), "--bootstrap-servers", bootstrap,
                     "--input-topic", input_topic, "--output-topic", output_topic, "--http-host", "127.0.0.1",
                     "--http-port", str(self.port), "--commit-interval-s", "0.5", "--session-timeout-ms", "6000",
                     *(["--group-id", group] if group else []), *extra]
        self.log_path = (log_dir or Path("/tmp")) / f"rnnd-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 60) -> DaemonProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.http("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples scraped over HTTP: {(name, sorted labels): value}."""
        status, text = self.http("/metrics")
        assert status == 200, status
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"daemon did not exit within {timeout}s:\n{self.log()[-3000:]}") from None
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Sent:
    key: bytes | None
    value: bytes
    partition: int
    offset: int


def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, Any]]) -> list[Sent]:
    """Send (key, value) pairs in order (value: dict → JSON, bytes as-is); returns coordinates."""

    async def run() -> list[Sent]:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
        await p.start()
        try:
            futs = []
            for key, value in items:
                raw = value if isinstance(value, (bytes, bytearray)) else json.dumps(value).encode()
                futs.append((key, raw, await p.send(topic, value=raw, key=key)))
            await p.flush()
            return [Sent(k, v, (md := f.result()).partition, md.offset) for k, v, f in futs]
        finally:
            await p.stop()

    return asyncio.run(run())


@dataclass
class Received:
    key: bytes | None
    value: dict
    partition: int
    offset: int
    raw: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def consume(bootstrap: str, topic: str, expect: int, timeout: float = 60, settle: float = 0.0,
            committed: bool = False) -> list[Received]:
    """Read the topic from the start until ``expect`` records arrived (then ``settle`` s more).
    ``committed``: as a downstream reader of exactly-once outputs reads (read_committed)."""

    async def run() -> list[Received]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             isolation_level="read_committed" if committed else "read_uncommitted")
        await c.start()
        try:
            parts = None
            deadline = time.monotonic() + timeout
            while parts is None and time.monotonic() < deadline:
                parts = c.partitions_for_topic(topic) or None
                if parts is None:
                    await c._client.force_metadata_update()
                    await asyncio.sleep(0.2)
            if parts is None:
                return []
            c.assign([TopicPartition(topic, p) for p in parts])
            await c.seek_to_beginning()
            out: list[Received] = []
            settle_until = None
            while time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=200)
                for tp, recs in batch.items():
                    out.extend(Received(r.key, orjson.loads(r.value), tp.partition, r.offset, r.value, tuple(r.headers))
                               for r in recs)
                if len(out) >= expect:
                    if settle_until is None:
                        settle_until = time.monotonic() + settle
                    if time.monotonic() >= settle_until:
                        break
            return out
        finally:
            await c.stop()

    return asyncio.run(run())
