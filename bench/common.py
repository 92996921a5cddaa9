"""What every hand-written contender shares, so that they differ only in what is being compared.

Each contender is its own program (``python -m bench.contenders.NAME ...``), started by the
harness as a separate process so that its CPU time can be read from ``/proc``. They all:

* read the input topic with the same aiokafka consumer settings as the daemon
  (``rnnd.daemon.kafka.consumer_settings``: 4 MiB per partition, 32 MiB per fetch) and write
  with the same producer settings (acks=all, linger 5 ms, 1 MiB batches);
* decode a message the same way (JSON → a list of steps) and build the same output document
  as the daemon (``Pipeline._doc``: key, id, coordinates, step, prediction, warmup, model,
  input/output timestamps), so every program pays for the same bytes on the wire;
* write a small JSON report when done (when they were assigned their partitions, when the
  last output was sent), from which the harness computes throughput with one rule for all.

A contender stops by itself after ``--expect`` outputs: the harness knows how many steps it
produced and does not need to watch the output topic while the measurement runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

# The daemon's client settings (rnnd.daemon.kafka), repeated here rather than imported: the
# benchmark must keep measuring the same thing while the daemon's code changes.
CONSUMER_SETTINGS: dict[str, Any] = {
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
    "fetch_max_bytes": 32 * 1024 * 1024,
    "auto_offset_reset": "earliest",
}
PRODUCER_SETTINGS: dict[str, Any] = {"acks": "all", "linger_ms": 5, "max_batch_size": 1024 * 1024}
FETCH_MAX_RECORDS = 10_000  # the daemon's fetch_max_records default
TOP_K = 5  # the daemon's top_k default: language models emit the 5 likeliest next tokens


def now_ms() -> int:
    return int(time.time() * 1000)


# --- codecs --------------------------------------------------------------------------------------

Loads = Callable[[bytes], Any]
Dumps = Callable[[Any], bytes]


def _json_dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


CODECS: dict[str, tuple[Loads, Dumps]] = {
    "json": (json.loads, _json_dumps),
    "orjson": (orjson.loads, orjson.dumps),
}


# --- the model's contract, read from the bundle --------------------------------------------------

@dataclass
class ModelInfo:
    """What a contender needs to know about the bundle to decode inputs and encode outputs.

    Read from the bundle's own metadata (``rnnd.daemon.bundle``) so that every contender
    normalises and de-normalises exactly like the daemon does.
    """

    path: Path
    spec: Any  # rnnd.daemon.bundle.BundleSpec
    numeric: bool
    n_features: int
    warmup: int
    ref: str
    heads: Any  # rnnd.daemon.heads.Heads

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
        import onnx

        from rnnd.daemon.bundle import spec_from_metadata
        from rnnd.daemon.heads import Heads

        m = onnx.load(str(path), load_external_data=False)
        spec = spec_from_metadata({p.key: p.value for p in m.metadata_props}, str(path))
        inp = spec.input
        numeric = inp.kind == "numeric"
        n = inp.n_features if numeric else 0
        return cls(
            path=Path(path), spec=spec, numeric=numeric, n_features=n, warmup=spec.warmup_steps,
            ref=spec.model.ref, heads=Heads(spec, TOP_K))

    def model_input(self, rows: list) -> np.ndarray:
        """One message's steps as ``[T, F]`` float32 (normalised) or ``[T]`` int64 ids."""
        if not self.numeric:
            return np.asarray(rows, dtype=np.int64)
        x = np.asarray(rows, dtype=np.float32)
        return self.spec.input.normalise(x) if self.spec.input.normalised else x

    def predictions(self, y: np.ndarray) -> list[dict[str, Any]]:
        """``y[N, O]`` → the daemon's prediction dicts (the daemon's own ``Heads``)."""
        return self.heads.predictions(y.reshape(-1, y.shape[-1]))

    def echo_prediction(self, rows: list) -> list[dict[str, Any]]:
        """A prediction of the same shape without a model, for the I/O ceiling: the inputs echoed."""
        out = self.spec.output
        if out.kind == "regression":
            names = list(out.names)
            return [{"values": dict(zip(names, row, strict=False))} for row in rows]
        vocab = list(out.vocab or out.labels)
        if out.kind == "classification":
            return [{"label": vocab[0], "probs": {v: 0.2 for v in vocab[:TOP_K]}} for _ in rows]
        return [{"next": [{"token": vocab[(t + i) % len(vocab)], "p": 0.2} for i in range(TOP_K)]} for t in rows]


def session_options() -> Any:
    """ONNX Runtime options as the daemon sets them (``BundleModel``): default thread count,
    no spinning. Without this the contenders' idle ORT threads would busy-wait and be charged
    CPU the daemon does not spend, which would make the comparison about a setting."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


# --- decoding and encoding -----------------------------------------------------------------------

class BadMessage(ValueError):
    """A message the contenders cannot use; the benchmark's data never has any."""


def decode(value: bytes, loads: Loads, info: ModelInfo) -> list:
    """A message → its steps: feature rows (lists of floats) or token ids. Validated the way a
    careful hand-written consumer would (count and type), not as thoroughly as the daemon."""
    doc = loads(value)
    if info.numeric:
        x = doc.get("x")
        if not isinstance(x, list) or not x:
            raise BadMessage("no x")
        rows = x if isinstance(x[0], list) else [x]
        out = []
        for r in rows:
            if len(r) != info.n_features:
                raise BadMessage("wrong feature count")
            out.append([float(v) for v in r])
        return out
    tokens = doc.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise BadMessage("no tokens")
    return [int(t) for t in tokens]


def output_doc(topic: str, key: bytes, partition: int, offset: int, timestamp: int, index: int, step: int,
               pred: dict[str, Any], info: ModelInfo, now: int) -> dict[str, Any]:
    """The daemon's output document (``Pipeline._doc``), field for field."""
    return {
        "key": key.decode(errors="replace"), "id": f"{topic}/{partition}/{offset}/{index}", "topic": topic,
        "partition": partition, "offset": offset, "index": index, "step": step, "prediction": pred,
        "warmup": step < info.warmup, "model": info.ref, "input_ts": timestamp, "output_ts": now,
    }


# --- the consumer loop ---------------------------------------------------------------------------

@dataclass
class Report:
    """What a contender tells the harness (written as JSON to ``--report`` at exit)."""

    name: str
    assigned_ms: int = 0  # partitions assigned: the measurement starts here
    first_record_ms: int = 0
    last_send_ms: int = 0
    done_ms: int = 0  # everything acknowledged by the broker
    messages: int = 0
    outputs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, path: str | None) -> None:
        if path:
            Path(path).write_text(json.dumps(self.__dict__))

    def mark_assigned(self, path: str | None) -> None:
        """Note the assignment now, and tell the harness (``REPORT.assigned``): in live mode it
        starts the traffic only once the contender is ready to read it."""
        self.assigned_ms = now_ms()
        if path:
            Path(f"{path}.assigned").write_text(str(self.assigned_ms))


@dataclass
class Ctx:
    """Handed to a contender's message handler: where to send, how to encode, what to count."""

    args: argparse.Namespace
    info: ModelInfo
    loads: Loads
    dumps: Dumps
    producer: Any
    report: Report
    input_topic: str

    pending: list[tuple[bytes, bytes]] = field(default_factory=list)  # --produce batch: this round's outputs
    partitions: int = 0  # --produce batch: of the output topic
    key_partition: dict[bytes, int] = field(default_factory=dict)

    async def emit(self, key: bytes, doc: dict[str, Any]) -> None:
        if self.args.produce == "batch":
            self.pending.append((key, self.dumps(doc)))
        else:
            await self.producer.send(self.args.output_topic, value=self.dumps(doc), key=key)
        self.report.outputs += 1

    async def send_pending(self) -> None:
        """``--produce batch``: one record batch per partition for the round's outputs, partitioned as
        Kafka's default partitioner does (murmur2 of the key, cached per key): what the daemon does."""
        if not self.pending:
            return
        from aiokafka.partitioner import murmur2

        if not self.partitions:
            self.partitions = len(await self.producer.partitions_for(self.args.output_topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        cache, n = self.key_partition, self.partitions
        for key, value in self.pending:
            p = cache.get(key)
            if p is None:
                p = cache[key] = (murmur2(key) & 0x7FFFFFFF) % n
            by_partition.setdefault(p, []).append((key, value))
        self.pending = []
        for p, items in by_partition.items():
            batch = self.producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    batch.close()
                    await self.producer.send_batch(batch, self.args.output_topic, partition=p)
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            batch.close()
            await self.producer.send_batch(batch, self.args.output_topic, partition=p)


Handler = Callable[[Ctx, list[tuple[int, Any]]], Awaitable[None]]  # (partition, ConsumerRecord) pairs
Idle = Callable[[Ctx], Awaitable[bool]]  # does pending work; True while work remains


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input-topic", required=True)
    p.add_argument("--output-topic", required=True)
    p.add_argument("--model", required=True, help="the bundle (.onnx): spec, normalisation, heads")
    p.add_argument("--expect", type=int, required=True, help="stop after this many outputs")
    p.add_argument("--codec", choices=sorted(CODECS), default="orjson")
    p.add_argument("--group", default="")
    p.add_argument("--report", default="", help="write the JSON report here")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    p.add_argument("--produce", choices=("send", "batch"), default="send",
                   help="one producer.send() per output (what hand-written consumers do), or one record batch "
                        "per partition per round of outputs (create_batch/send_batch, as the daemon does)")
    p.add_argument("--fetch-max-wait-ms", type=int, default=500,
                   help="how long the broker may hold a fetch for data (aiokafka's default, which the daemon uses)")
    return p


async def serve(args: argparse.Namespace, name: str, handle: Handler, idle: Idle | None = None) -> Report:
    """Consume → ``handle`` → produce until ``args.expect`` outputs, then flush and report.

    Partitions are assigned by hand (all partitions of the input topic, from the start) rather
    than through a group join: on Tansu a join pauses ~3 s, which is excluded from the
    measurement anyway but would make every run of the benchmark 3 s longer. Offsets are still
    committed to ``--group`` (auto-commit, as most hand-written consumers do).
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    info = ModelInfo.load(args.model)
    loads, dumps = CODECS[args.codec]
    report = Report(name)
    consumer = AIOKafkaConsumer(bootstrap_servers=args.bootstrap, group_id=args.group or f"bench-{name}",
                                enable_auto_commit=True, auto_commit_interval_ms=1000,
                                fetch_max_wait_ms=args.fetch_max_wait_ms, **CONSUMER_SETTINGS)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, **PRODUCER_SETTINGS)
    await consumer.start()
    await producer.start()
    try:
        parts = await _partitions(consumer, args.input_topic)
        consumer.assign([TopicPartition(args.input_topic, p) for p in sorted(parts)])
        await consumer.seek_to_beginning()
        report.mark_assigned(args.report)
        ctx = Ctx(args, info, loads, dumps, producer, report, args.input_topic)
        deadline = time.monotonic() + args.timeout
        busy = False
        while report.outputs < args.expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=0 if busy else 100, max_records=FETCH_MAX_RECORDS)
            for tp, records in batches.items():
                if records and not report.first_record_ms:
                    report.first_record_ms = now_ms()
                report.messages += len(records)
                await handle(ctx, [(tp.partition, r) for r in records])
            busy = await idle(ctx) if idle is not None else False
            await ctx.send_pending()
            report.last_send_ms = now_ms()
        await producer.flush()
        report.done_ms = now_ms()
    finally:
        await producer.stop()
        await consumer.stop()
    return report


async def _partitions(consumer: Any, topic: str, timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions after {timeout}s")


def main(argv: Sequence[str] | None, name: str, description: str,
         setup: Callable[[argparse.Namespace], tuple[Handler, Idle | None]],
         extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the common flags, build the contender (``setup``: model loading is not timed: it
    happens before the partitions are assigned), run it, write the report."""
    p = base_parser(description)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    handle, idle = setup(args)
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        report = runner.run(serve(args, name, handle, idle))
    report.write(args.report)
    return 0 if report.outputs >= args.expect else 1
