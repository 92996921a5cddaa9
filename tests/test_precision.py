"""Bundle precision: an int8 bundle proven within its tolerance and served; fp16 refused where it cannot run.

int8 is ONNX Runtime's dynamic quantization of the exported graph, proven against PyTorch's
float32 like any bundle (at PRECISIONS' tolerance). An fp16 bundle cannot run on the CPU
provider (its session creation crashes), so the exporter refuses to make one without a GPU and
the daemon refuses to load one on the CPU, each with one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_checks import one_line_error

from rnnd.daemon.bundle import PRECISIONS, InputSpec, OutputSpec, attach, load_proto, read_bytes
from rnnd.daemon.errors import ProviderError
from rnnd.daemon.local import Session
from rnnd.daemon.runtime import BundleModel
from rnnd.export import zoo
from rnnd.export.errors import ExportError
from rnnd.export.exporter import ExportOptions, export_bundle
from rnnd.export.parity import ParityPlan

IN = InputSpec("numeric", features=("a", "b", "c"), mean=(1.0, 0.0, -1.0), std=(2.0, 1.0, 0.5))
OUT = OutputSpec("regression", names=("y1", "y2"))


@pytest.fixture(scope="module")
def lstm_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One 2-layer LSTM exported twice: fp32 and int8."""
    folder = tmp_path_factory.mktemp("precision")
    torch.manual_seed(5)
    model = zoo.build(cell="lstm", n_features=3, hidden=32, layers=2, out_size=2)
    out = []
    for precision in ("fp32", "int8"):
        path = folder / f"{precision}.onnx"
        export_bundle(model, ExportOptions(name="lstm", version=precision, input=IN, output=OUT, precision=precision,
                                           parity=ParityPlan(tolerance=PRECISIONS[precision])), path)
        out.append(path)
    return out[0], out[1]


def test_an_int8_bundle_is_proven_at_its_tolerance_and_serves_the_same_streams(lstm_bundles) -> None:
    fp32, int8 = (BundleModel(p) for p in lstm_bundles)
    spec = int8.spec
    assert spec.precision == "int8" and fp32.spec.precision == "fp32"
    assert spec.parity is not None and spec.parity.tolerance == PRECISIONS["int8"]
    assert spec.parity.max_abs_err <= spec.parity.tolerance
    assert spec.self_check is not None and int8.self_check() <= spec.self_check.tolerance
    ops = {n.op_type for n in onnx.load(lstm_bundles[1]).graph.node}
    assert "DynamicQuantizeLSTM" in ops  # the recurrence itself runs quantized
    assert spec.state_hash == fp32.spec.state_hash  # state stays float32: streams move between them
    assert [i.type for i in int8.session.get_inputs()] == ["tensor(float)"] * 3
    rng = np.random.default_rng(2)
    messages = [(f"k{i % 10}", {"x": rng.standard_normal(3).tolist()}) for i in range(200)]
    a, b = Session(fp32).predict(messages), Session(int8).predict(messages)
    err = max(abs(x["prediction"]["values"][n] - y["prediction"]["values"][n])
              for x, y in zip(a, b, strict=True) for n in ("y1", "y2"))
    assert 0 < err <= PRECISIONS["int8"], err  # quantized (not the fp32 graph), within its stated tolerance
    assert {d["model"] for d in b} == {"lstm@int8"}


def test_the_export_cli_takes_the_precision_and_its_tolerance(lstm_bundles, rnnd, tmp_path: Path) -> None:
    """rnnd export --precision int8 proves the bundle at int8's tolerance unless --tolerance says otherwise;
    rnnd inspect names the precision and re-runs the self-check at it."""
    import types

    from rnnd.export.cli import _parity_plan

    assert _parity_plan(types.SimpleNamespace(precision="int8", tolerance=None, parity_batches=None)).tolerance == 0.1
    assert _parity_plan(types.SimpleNamespace(precision="int8", tolerance=0.3, parity_batches=None)).tolerance == 0.3
    assert _parity_plan(types.SimpleNamespace(precision="fp32", tolerance=None, parity_batches=None)).tolerance == 1e-4
    res = rnnd("inspect", lstm_bundles[1])
    assert res.code == 0 and "mode         : stateful, precision int8" in res.out and "ok" in res.out


def test_fp16_is_refused_where_it_cannot_run(lstm_bundles, tmp_path: Path, rnnd) -> None:
    torch.manual_seed(5)
    model = zoo.build(cell="lstm", n_features=3, hidden=8, out_size=2)
    with pytest.raises(ExportError, match="--precision fp16 needs a GPU to prove its parity"):
        export_bundle(model, ExportOptions(name="m", input=IN, output=OUT, precision="fp16"), tmp_path / "m.onnx")
    # A bundle that declares fp16 is refused on the CPU provider before ONNX Runtime sees its graph.
    proto = load_proto(read_bytes(lstm_bundles[0]))
    attach(proto, dataclasses.replace(BundleModel(lstm_bundles[0]).spec, precision="fp16"))
    fp16 = tmp_path / "fp16.onnx"
    fp16.write_bytes(proto.SerializeToString())
    with pytest.raises(ProviderError, match="is an fp16 bundle, which ONNX Runtime's CPU provider cannot run"):
        BundleModel(fp16)
    res = rnnd("serve", "--check", "--model", fp16, "--input-topic", "in", "--output-topic", "out")
    one_line_error(res, 2, "serve it with --provider cuda, or export the model with --precision fp32 or int8")


def test_provider_chains_and_tensorrt_engine_cache() -> None:
    """What ONNX Runtime is asked for: CPU last in every chain; TensorRT with CUDA behind it, and its engine
    cache where tensorrt_cache_dir says (a restart then loads the engines it built)."""
    from rnnd.daemon.runtime import provider_list

    assert provider_list("cpu") == ["CPUExecutionProvider"]
    assert provider_list("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert provider_list("tensorrt") == [("TensorrtExecutionProvider", {"device_id": 0}),
                                         ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert provider_list("tensorrt:2", "/var/cache/trt") == [
        ("TensorrtExecutionProvider", {"device_id": 2, "trt_engine_cache_enable": "True",
                                       "trt_engine_cache_path": "/var/cache/trt"}),
        ("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
