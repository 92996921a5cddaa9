"""Bundle precision: int8 and fp16 bundles proven within their tolerances and served; int8 refused on GPUs.

int8 is ONNX Runtime's dynamic quantization of the exported graph, fp16 its float16 conversion;
both are proven against PyTorch's float32 like any bundle (at PRECISIONS' tolerance). int8's
quantized ops run on the CPU provider only, so the daemon refuses an int8 bundle on CUDA or
TensorRT with one line rather than let ONNX Runtime place them on the CPU behind its back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rnnd.daemon.bundle import PRECISIONS, InputSpec, OutputSpec, load_proto, read_bytes
from rnnd.daemon.errors import ProviderError
from rnnd.daemon.local import Session
from rnnd.daemon.runtime import BundleModel
from rnnd.export import zoo
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


def test_an_fp16_bundle_is_proven_at_its_tolerance_and_an_int8_one_is_refused_on_the_gpu(
        lstm_bundles, tmp_path: Path, rnnd) -> None:
    """--precision fp16 converts the graph (half-precision weights and LSTM), proves it against PyTorch at
    fp16's tolerance and serves on the CPU provider; an int8 bundle asked to run on CUDA is refused before
    ONNX Runtime sees it (its quantized ops would silently run on the CPU)."""
    torch.manual_seed(5)
    model = zoo.build(cell="lstm", n_features=3, hidden=32, layers=2, out_size=2)
    path = tmp_path / "fp16.onnx"
    export_bundle(model, ExportOptions(name="lstm", version="fp16", input=IN, output=OUT, precision="fp16",
                                       parity=ParityPlan(tolerance=PRECISIONS["fp16"])), path)
    fp32, fp16 = BundleModel(lstm_bundles[0]), BundleModel(path)
    assert fp16.spec.precision == "fp16" and fp16.spec.parity is not None
    assert fp16.spec.parity.tolerance == PRECISIONS["fp16"] and fp16.spec.parity.max_abs_err <= 1e-2
    assert fp16.spec.state_hash == fp32.spec.state_hash  # same state layout: streams continue across precisions
    half = {init.data_type for init in load_proto(read_bytes(path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in half  # the weights really are half precision
    rng = np.random.default_rng(0)
    messages = [(f"k{i % 5}", {"x": rng.standard_normal(3).tolist()}) for i in range(60)]
    a, b = Session(fp32).predict(messages), Session(fp16).predict(messages)
    err = max(abs(x["prediction"]["values"][n] - y["prediction"]["values"][n])
              for x, y in zip(a, b, strict=True) for n in ("y1", "y2"))
    assert 0 < err <= PRECISIONS["fp16"], err  # half precision (not the fp32 graph), within its tolerance
    assert {d["model"] for d in b} == {"lstm@fp16"}

    with pytest.raises(ProviderError, match="is an int8 bundle, whose quantized ops ONNX Runtime runs on the CPU"):
        BundleModel(lstm_bundles[1], providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])


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
