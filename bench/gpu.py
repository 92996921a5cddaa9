"""The device check: what a GPU machine gives rnnd, in one run (``python -m bench.gpu``).

Prints, as Markdown tables for docs/benchmarks.md:

1. the providers ONNX Runtime offers here, and the one each session really runs on;
2. parity CUDA vs CPU: the shipped sensors bundle's self-check on each provider, and the max
   difference between the two providers' outputs on the same random input;
3. the compute ceiling, steps/s, for B in ``--batches`` (default 1, 64, 512, 4096, 32768) of the
   sensors model (2-layer LSTM, H=64) and a large one (2-layer LSTM, H=1024, random weights,
   built here without torch): host-gathered state (``state.StateArena``) against device-resident
   state (``device.DeviceArena``), fp32 against fp16 (converted here with ONNX Runtime's
   float16 tool, inputs, outputs and state kept float32), on each provider, one step per call
   with the state's round trip, as the daemon makes its calls;
4. with ``--e2e``: the daemon end to end on the embedded broker (``python -m bench --only wide``,
   the daemon on the device's provider through ``RNND_PROVIDER``), its table as the benchmark
   prints it.

On a machine without CUDA it prints the CPU rows and says that the CUDA rows were not
measured. Nothing is downloaded; ``--seconds`` bounds each measurement (the whole run stays
within ~8 minutes at the defaults on a GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SENSORS = REPO / "cli" / "demo_bundle" / "sensors.onnx"
BATCHES = (1, 64, 512, 4096, 32768)


def large_lstm(hidden: int = 1024, layers: int = 2, features: int = 8) -> bytes:
    """A sealed bundle of a ``layers``-layer LSTM, random weights, in the bundle's I/O contract, made with
    onnx alone: x [B,T,F] → y [B,T,F]; h, c [L,B,H] in and out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rnnd.daemon.bundle import BundleSpec, InputSpec, ModelInfo, OutputSpec, StateSpec, attach

    rng = np.random.default_rng(0)
    scale = 1 / np.sqrt(hidden)
    inits, nodes = [], [helper.make_node("Transpose", ["x"], ["seq0"], perm=[1, 0, 2])]
    hs, cs = [], []
    for layer in range(layers):
        n_in = features if layer == 0 else hidden
        for name, shape in ((f"W{layer}", (1, 4 * hidden, n_in)), (f"R{layer}", (1, 4 * hidden, hidden)),
                            (f"B{layer}", (1, 8 * hidden))):
            inits.append(numpy_helper.from_array(rng.uniform(-scale, scale, shape).astype(np.float32), name))
        for s in ("h", "c"):
            nodes.append(helper.make_node("Slice", [f"{s}_in", f"s{layer}", f"e{layer}", "ax0"], [f"{s}{layer}"]))
        inits += [numpy_helper.from_array(np.array([layer], np.int64), f"s{layer}"),
                  numpy_helper.from_array(np.array([layer + 1], np.int64), f"e{layer}")]
        nodes.append(helper.make_node("LSTM", [f"seq{layer}", f"W{layer}", f"R{layer}", f"B{layer}", "",
                                               f"h{layer}", f"c{layer}"],
                                      [f"out{layer}", f"hn{layer}", f"cn{layer}"], hidden_size=hidden))
        nodes.append(helper.make_node("Squeeze", [f"out{layer}", "ax1"], [f"seq{layer + 1}"]))
        hs.append(f"hn{layer}")
        cs.append(f"cn{layer}")
    inits += [numpy_helper.from_array(np.array([0], np.int64), "ax0"),
              numpy_helper.from_array(np.array([1], np.int64), "ax1"),
              numpy_helper.from_array(rng.uniform(-scale, scale, (hidden, features)).astype(np.float32), "Wy")]
    nodes += [helper.make_node("Concat", hs, ["h_out"], axis=0), helper.make_node("Concat", cs, ["c_out"], axis=0),
              helper.make_node("Transpose", [f"seq{layers}"], ["seqb"], perm=[1, 0, 2]),
              helper.make_node("MatMul", ["seqb", "Wy"], ["y"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "large_lstm", [
        helper.make_tensor_value_info("x", f, ["B", "T", features]),
        helper.make_tensor_value_info("h_in", f, [layers, "B", hidden]),
        helper.make_tensor_value_info("c_in", f, [layers, "B", hidden])], [
        helper.make_tensor_value_info("y", f, ["B", "T", features]),
        helper.make_tensor_value_info("h_out", f, [layers, "B", hidden]),
        helper.make_tensor_value_info("c_out", f, [layers, "B", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    names = tuple(f"f{i}" for i in range(features))
    states = tuple(StateSpec(s, (layers, hidden), 1, f"{s}_in", f"{s}_out") for s in ("h", "c"))
    spec = BundleSpec(ModelInfo(f"lstm-h{hidden}", "bench"), "stateful", InputSpec("numeric", features=names),
                      OutputSpec("regression", names=names), states)
    attach(model, spec)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fp16_of(data: bytes) -> bytes:
    """The bundle's graph in fp16 as ``rnnd export --precision fp16`` makes it (inputs, outputs and
    state float32), resealed."""
    from rnnd.daemon.bundle import attach, load_proto, metadata_entries, spec_from_metadata
    from rnnd.export.precision import at_precision

    proto = load_proto(data)
    spec = spec_from_metadata(metadata_entries(proto))
    half = at_precision(proto, "fp16")
    attach(half, dataclasses.replace(spec, precision="fp16"))
    return half.SerializeToString()


def providers() -> list[str]:
    import onnxruntime as ort

    return ["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else []


def ceiling(data: bytes, provider: str, batches: Sequence[int], seconds: float,
            say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Steps/s at each B: one step per call with the state's round trip, host arena and device state."""
    from rnnd.daemon.device import DeviceArena, placement_of
    from rnnd.daemon.runtime import BundleModel, provider_list
    from rnnd.daemon.state import StateArena

    m = BundleModel(data, providers=provider_list(provider))
    placement = placement_of(m.session)
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        slots = np.arange(b, dtype=np.int64)
        x = rng.standard_normal((b, 1, m.spec.input.n_features)).astype(np.float32)
        row: dict[str, Any] = {"batch": b}
        for name in ("host", "device"):
            arena: Any = StateArena(m.spec, b) if name == "host" else DeviceArena(m.spec, b, placement)
            run = (m.run if name == "host" else
                   (lambda x, s: m.run_bound(x, s, placement.device, placement.device_id)))
            try:
                for _ in range(3):
                    _, new = run(x, arena.gather(slots))
                    arena.scatter(slots, new)
                calls, t0 = 0, time.perf_counter()
                while True:
                    _, new = run(x, arena.gather(slots))
                    arena.scatter(slots, new)
                    calls += 1
                    took = time.perf_counter() - t0
                    if took >= seconds and calls >= 3:
                        break
                row[name] = b * calls / took
            except Exception as e:  # out of device memory at the largest B, say: reported, not fatal
                row[name] = None
                say(f"  {m.spec.model.ref} {provider} B={b} {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        rows.append(row)
        say(f"  {m.spec.model.ref} on {m.providers[0]} B={b}: host {fmt(row['host'])}, device {fmt(row['device'])}")
    return rows


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement (default 1)")
    p.add_argument("--hidden", type=int, default=1024, help="the large LSTM's width (default 1024)")
    p.add_argument("--e2e", action="store_true", help="also the daemon end to end on the embedded broker")
    args = p.parse_args(argv)
    import onnxruntime as ort

    from rnnd.daemon.bundle import read_bytes
    from rnnd.daemon.runtime import BundleModel, provider_list

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    devices = ["cpu", *providers()]
    print(f"## Device check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print(f"onnxruntime {ort.__version__}, providers offered: {', '.join(ort.get_available_providers())}")
    if "cuda" not in devices:
        print("\nNo CUDA provider here: the CUDA rows were NOT measured.")
    sensors = read_bytes(SENSORS)
    print("\n| bundle | provider asked | runs on | self-check max abs err |\n|---|---|---|---:|")
    outputs = {}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 20, 8)).astype(np.float32)
    for dev in devices:
        m = BundleModel(sensors, providers=provider_list(dev))
        print(f"| {m.spec.model.ref} | {dev} | {m.providers[0]} | {m.self_check():.2e} |")
        outputs[dev] = m.run_sequence(x, chunk=1)[0]
    if "cuda" in outputs:
        diff = float(np.abs(outputs["cuda"] - outputs["cpu"]).max())
        print(f"\nCUDA vs CPU, 64 streams × 20 steps: max abs difference {diff:.2e}")
    models = [("sensors (2-layer LSTM, H=64)", sensors), (f"2-layer LSTM, H={args.hidden}", large_lstm(args.hidden))]
    print("\n| model | provider | precision | state | " + " | ".join(f"B={b}" for b in batches) + " |")
    print("|---|---|---|---|" + "---:|" * len(batches))
    for label, data in models:
        for dev in devices:
            for precision, graph in (("fp32", data), ("fp16", fp16_of(data))):
                rows = ceiling(graph, dev, batches, args.seconds, say)
                for state in ("host", "device"):
                    cells = " | ".join(fmt(r[state]) for r in rows)
                    print(f"| {label} | {dev} | {precision} | {state} | {cells} |", flush=True)
    print("\nsteps/s: one step per call for B streams, with the state's round trip (host: numpy gather, copied "
          "in and out by ONNX Runtime; device: gather, IO-bound call and scatter on the device).")
    if args.e2e:
        provider = "cuda" if "cuda" in devices else "cpu"
        cmd = [sys.executable, "-m", "bench", "--only", "wide", "--contenders", "rnnd", "--no-write-docs",
               "--no-profile"]
        say(f"e2e: RNND_PROVIDER={provider} {' '.join(cmd)}")
        env = {**os.environ, "RNND_PROVIDER": provider}  # read by the daemon the benchmark starts
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        print("\n### End to end on the embedded broker\n\n" + (done.stdout or done.stderr[-3000:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
