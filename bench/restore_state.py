"""How long a replica takes to restore its streams' state from the changelog.

    python -m bench.restore_state [--streams 100000] [--partitions 4] [--model models/sensors.onnx]

Writes one changelog record per stream (the sensors recipe's 2-layer LSTM: 1 KiB of state)
into a changelog topic on the embedded broker, then runs exactly what the daemon runs on
assignment — ``changelog.restore_partitions`` and ``Pipeline.restore`` — and prints a table.
Timings are wall-clock on a shared machine: run it twice and quote the figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np


async def _run(streams: int, partitions: int, model_path: Path) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from rnnd.daemon import changelog
    from rnnd.daemon.config import ServeConfig
    from rnnd.daemon.pipeline import Pipeline
    from rnnd.daemon.runtime import BundleModel
    from rnnd.embedded_broker import EmbeddedBroker, create_topics

    model = BundleModel(model_path)
    spec = model.spec
    layout = changelog.layout_of(spec)
    rng = np.random.default_rng(0)
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap_servers
        await create_topics(bs, {"bench.changelog": partitions}, {"bench.changelog": {"cleanup.policy": "compact"}})
        producer = AIOKafkaProducer(bootstrap_servers=bs, linger_ms=20, max_batch_size=1024 * 1024)
        await producer.start()
        t0 = time.perf_counter()
        nbytes = 0
        for i in range(streams):
            tensors = [rng.standard_normal(shape).astype(dtype) for dtype, shape in layout]
            value = changelog.encode(changelog.StreamState(tensors, 100, 1000 + i, 0, spec.state_hash))
            nbytes += len(value)
            await producer.send("bench.changelog", key=f"dev-{i}".encode(), value=value, partition=i % partitions)
            if i % 20_000 == 0 and i:
                print(f"  wrote {i} records", flush=True)
        await producer.flush()
        await producer.stop()
        write_s = time.perf_counter() - t0

        consumer = AIOKafkaConsumer(bootstrap_servers=bs, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_bytes=64 * 1024 * 1024,
                                    max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        try:
            t0 = time.perf_counter()
            result = await changelog.restore_partitions(consumer, "bench.changelog", list(range(partitions)), spec,
                                                        "refuse")
            read_s = time.perf_counter() - t0
        finally:
            await consumer.stop()
        cfg = ServeConfig(model=str(model_path), input_topic="bench", output_topic="out",
                          max_streams=max(streams, 1)).validate()
        pipeline = Pipeline(model, cfg, "bench")
        t0 = time.perf_counter()
        for p, states in result.states.items():
            pipeline.restore(p, states)
        install_s = time.perf_counter() - t0
        assert pipeline.streams.active == streams, pipeline.streams.active
    return {"streams": streams, "partitions": partitions, "state_bytes": spec.state_bytes_per_stream,
            "changelog_mb": nbytes / 1e6, "write_s": write_s, "read_decode_s": read_s, "install_s": install_s,
            "restore_s": read_s + install_s, "streams_per_s": streams / (read_s + install_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--model", type=Path, default=Path("models/sensors.onnx"))
    args = ap.parse_args()
    if not args.model.exists():
        from rnnd.export.recipes import run_recipe

        run_recipe("sensors", args.model.parent, progress=False)
    r = asyncio.run(_run(args.streams, args.partitions, args.model))
    print()
    print("| streams | partitions | state B/stream | changelog MB | read+decode s | install s | restore s "
          "| streams/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['streams']:,} | {r['partitions']} | {r['state_bytes']} | {r['changelog_mb']:.0f} | "
          f"{r['read_decode_s']:.2f} | {r['install_s']:.2f} | {r['restore_s']:.2f} | {r['streams_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
