"""Measurements without Kafka, each in a fresh process so that nothing else shares its memory or cores.

``python -m bench.ceilings compute --model M --batches 1,64,512,1024``
    The compute ceiling: the bundle alone in ONNX Runtime, with the daemon's session options
    (``rnnd.daemon.runtime.BundleModel``), one step (T=1) for B streams per call, state fed
    back. Steps/s at each B: what no serving loop on this machine can exceed.

``python -m bench.ceilings memory --model M --streams N``
    Memory per stream: RSS growth of a process that holds the daemon's ``Streams`` with N
    streams allocated and touched (``slot()`` for N keys, then one scatter of new state over
    all of them), against the raw state bytes (``StateSpec.nbytes`` summed over the states).

``python -m bench.ceilings arena --model M --batches 1,64,512 --provider cpu``
    A model call with its state's round trip, as the daemon makes it: B streams at random
    slots of an arena of ``--capacity`` streams, gathered, run (T=1), scattered back. Host
    arena (``state.StateArena``: numpy, ONNX Runtime copies state in and out) against device
    state (``device.DeviceArena``: gather, IO-bound call and scatter on the provider's device).
    On a GPU the second saves two transfers of the state per call; on the CPU it is the same
    work through more ONNX Runtime calls, so this measures what the device path costs there.

``python -m bench.ceilings pipeline --model M --messages 100000 --keys 10000``
    The daemon's pipeline alone, per message: ``accept_many → plan → execute → finish`` (the
    code ``rnnd serve`` runs between its consumer and producer) over the wide workload's
    messages, fed as the daemon is fed: real record batches parsed by aiokafka's fetcher code
    (the C records the daemon takes, ``kafka.quirks``), fetches of ``fetch_max_records`` per
    partition taken in slices of the fetcher's ``INTAKE_SLICE``, a round after each slice, the
    daemon's GC threshold. µs per message for each stage and in all, best of ``--repeat``: the
    Python the event loop runs for each message, without the Kafka client's I/O and the sink.

Each prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def compute(model: str, batches: list[int], seconds: float) -> dict[str, Any]:
    from rnnd.daemon.runtime import BundleModel

    m = BundleModel(model)
    spec = m.spec
    rng = np.random.default_rng(0)
    out = []
    for b in batches:
        if spec.input.kind == "numeric":
            x = rng.standard_normal((b, 1, spec.input.n_features)).astype(np.float32)
        else:
            x = rng.integers(2, spec.input.vocab_size, size=(b, 1)).astype(np.int64)
        state = m.initial_state(b)
        for _ in range(3):  # warm-up: first calls at a new shape allocate
            _, state = m.run(x, state)
        calls, t0 = 0, time.perf_counter()
        while True:
            _, state = m.run(x, state)
            calls += 1
            took = time.perf_counter() - t0
            if took >= seconds and calls >= 5:
                break
        out.append({"batch": b, "us_per_call": took / calls * 1e6, "steps_per_s": b * calls / took})
    return {"model": spec.model.ref, "results": out}


def arena(model: str, batches: list[int], seconds: float, provider: str, capacity: int) -> dict[str, Any]:
    from rnnd.daemon.device import DeviceArena, placement_of
    from rnnd.daemon.runtime import open_bundle
    from rnnd.daemon.state import StateArena

    m, choice = open_bundle(model, provider)
    spec = m.spec
    placement = placement_of(m.session)
    rng = np.random.default_rng(0)
    out = []
    for b in batches:
        slots = np.sort(rng.choice(capacity, size=min(b, capacity), replace=False)).astype(np.int64)
        if spec.input.kind == "numeric":
            x = rng.standard_normal((len(slots), 1, spec.input.n_features)).astype(np.float32)
        else:
            x = rng.integers(2, spec.input.vocab_size, size=(len(slots), 1)).astype(np.int64)
        row: dict[str, Any] = {"batch": len(slots)}
        for name in ("host", "device"):
            if name == "host":
                a: Any = StateArena(spec, capacity)

                def call(a: Any = a, x: np.ndarray = x, slots: np.ndarray = slots) -> None:
                    _, new = m.run(x, a.gather(slots))
                    a.scatter(slots, new)
            else:
                a = DeviceArena(spec, capacity, placement)

                def call(a: Any = a, x: np.ndarray = x, slots: np.ndarray = slots) -> None:
                    _, new = m.run_bound(x, a.gather(slots), placement.device, placement.device_id)
                    a.scatter(slots, new)
            for _ in range(3):
                call()
            calls, t0 = 0, time.perf_counter()
            while True:
                call()
                calls += 1
                took = time.perf_counter() - t0
                if took >= seconds and calls >= 5:
                    break
            row[f"{name}_steps_per_s"] = len(slots) * calls / took
        row["device_over_host"] = row["device_steps_per_s"] / row["host_steps_per_s"]
        out.append(row)
    return {"model": spec.model.ref, "provider": choice.actual, "capacity": capacity, "results": out}


def _rss() -> int:
    import os

    from bench.harness import proc_cpu_rss

    return proc_cpu_rss(os.getpid())[1]


def _trim() -> None:
    """Collect garbage and hand freed heap pages back (glibc ``malloc_trim``): memory freed
    before the baseline (loading the bundle) would otherwise be reused unseen by the arena."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _take(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    return a[(slice(None),) * axis + (slice(0, n),)]


def memory(model: str, streams: int) -> dict[str, Any]:
    import onnx

    from rnnd.daemon.bundle import spec_from_metadata
    from rnnd.daemon.state import StateArena, Streams

    m = onnx.load(model, load_external_data=False)
    spec = spec_from_metadata({p.key: p.value for p in m.metadata_props}, model)
    del m
    gc.collect()
    raw = sum(s.nbytes for s in spec.states)
    # One chunk of new state, made before the baseline and reused: temporaries as large as the
    # arena would stay in the allocator's heap and be counted as if the streams held them.
    chunk = 1024
    new = [np.random.default_rng(0).standard_normal(s.graph_shape(chunk)).astype(s.dtype) for s in spec.states]
    _trim()
    before = _rss()
    t0 = time.perf_counter()
    st = Streams(spec, capacity=streams, ttl_s=3600.0)
    for i in range(streams):  # keys are made here and held only by Streams, as in the daemon
        st.slot(i % 4, b"dev-%09d" % i)
    alloc_s = time.perf_counter() - t0
    arena = st.arena
    assert isinstance(arena, StateArena)
    for lo in range(0, streams, chunk):
        slots = np.arange(lo, min(streams, lo + chunk), dtype=np.int64)
        arena.scatter(slots, [_take(a, len(slots), s.batch_axis) for a, s in zip(new, spec.states, strict=True)])
    _trim()
    after = _rss()
    growth = after - before
    return {"model": spec.model.ref, "streams": streams, "raw_bytes_per_stream": raw,
            "rss_growth_bytes": growth, "rss_bytes_per_stream": growth / streams,
            "ratio_to_raw": growth / (raw * streams), "target_bytes_per_stream": 1.5 * raw + 256,
            "slot_alloc_us": alloc_s / streams * 1e6, "active": st.active}


def pipeline(model: str, messages: int, keys: int, repeat: int) -> dict[str, Any]:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    from bench.common import ModelInfo
    from bench.workloads import Data
    from rnnd.daemon.config import ServeConfig
    from rnnd.daemon.kafka.quirks import fetched_records
    from rnnd.daemon.kafka.sink import default_partitions
    from rnnd.daemon.pipeline import pipeline_for
    from rnnd.daemon.runtime import open_served
    from rnnd.daemon.service.budgets import INTAKE_SLICE

    cfg = ServeConfig(model=model, input_topic="in", output_topic="out", changelog=False).validate()
    bundle = open_served(cfg.model, cfg)[0]
    items = list(Data("numeric", keys, messages, 1, seed=1, key_prefix="dev-").items(ModelInfo.load(model).spec))
    parts = 4
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in range(parts)}
    for (k, v), p in zip(items, default_partitions([k for k, _ in items], parts), strict=True):
        by_partition[p].append((k, v))
    fetch = cfg.fetch_max_records
    fetches: dict[int, list[tuple[int, bytes]]] = {}  # partition -> (first offset, record batch bytes)
    for p, kv in by_partition.items():
        fetches[p] = []
        for first in range(0, len(kv), fetch):
            builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 30)
            for i, (k, v) in enumerate(kv[first:first + fetch]):
                builder.append(i, 1_700_000_000_000, k, v, [])
            buf = bytearray(builder.build())
            buf[:8] = first.to_bytes(8, "big")  # the batch's base offset (outside its CRC)
            fetches[p].append((first, bytes(buf)))
    gc.set_threshold(cfg.gc_threshold, *gc.get_threshold()[1:])
    timer = time.perf_counter
    best: dict[str, float] = {}
    record_type = ""
    for _ in range(repeat):
        line = pipeline_for(bundle, cfg, "in")
        spent = dict.fromkeys(("parse", "accept_many", "plan", "execute", "finish"), 0.0)
        outputs = 0
        gc.collect()
        t_all = timer()
        for j in range(max(len(f) for f in fetches.values())):
            for p, batches in fetches.items():
                if j >= len(batches):
                    continue
                first, raw = batches[j]
                t = timer()
                records = fetched_records("in", p, raw, first)
                spent["parse"] += timer() - t
                record_type = type(records[0]).__name__
                for s in range(0, len(records), INTAKE_SLICE):
                    t = timer()
                    line.accept_many(p, records[s:s + INTAKE_SLICE])
                    spent["accept_many"] += timer() - t
                    outputs += max(0, _round(line, spent))
        while (n := _round(line, spent)) >= 0:
            outputs += n
        spent["total"] = timer() - t_all
        if outputs != messages:
            raise RuntimeError(f"{outputs} outputs for {messages} messages")
        for stage, seconds in spent.items():
            best[stage] = min(best.get(stage, seconds), seconds)
    return {"what": "pipeline", "model": bundle.spec.model.ref, "messages": messages, "keys": keys,
            "repeat": repeat, "record_type": record_type,
            "us_per_message": {stage: sec / messages * 1e6 for stage, sec in best.items()}}


def _round(line: Any, spent: dict[str, float]) -> int:
    """One round of model calls, each stage timed; its outputs, or -1 when there was nothing to do."""
    timer = time.perf_counter
    t = timer()
    calls = line.plan()
    spent["plan"] += (t1 := timer()) - t
    calls = line.execute(calls)
    spent["execute"] += (t2 := timer()) - t1
    n = len(line.finish(calls))
    spent["finish"] += timer() - t2
    return n if calls else -1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compute")
    c.add_argument("--model", required=True)
    c.add_argument("--batches", default="1,64,512,1024")
    c.add_argument("--seconds", type=float, default=0.5)
    m = sub.add_parser("memory")
    m.add_argument("--model", required=True)
    m.add_argument("--streams", type=int, required=True)
    r = sub.add_parser("arena")
    r.add_argument("--model", required=True)
    r.add_argument("--batches", default="1,64,512,4096")
    r.add_argument("--seconds", type=float, default=0.5)
    r.add_argument("--provider", default="cpu")
    r.add_argument("--capacity", type=int, default=100_000)
    q = sub.add_parser("pipeline")
    q.add_argument("--model", required=True)
    q.add_argument("--messages", type=int, default=100_000)
    q.add_argument("--keys", type=int, default=10_000)
    q.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if args.what == "pipeline":
        doc = pipeline(args.model, args.messages, args.keys, args.repeat)
    elif args.what == "compute":
        doc = compute(args.model, [int(b) for b in args.batches.split(",")], args.seconds)
    elif args.what == "arena":
        doc = arena(args.model, [int(b) for b in args.batches.split(",")], args.seconds, args.provider,
                    args.capacity)
    else:
        doc = memory(args.model, args.streams)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
