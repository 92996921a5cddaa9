"""Daemon behaviour on the real broker: controls, warm-up, eviction, forecasts, generation,
dead letters, metrics, shutdown and device selection."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from daemon_harness import DaemonProcess, consume, free_port, produce

from rnnd.daemon.runtime import BundleModel
from rnnd.daemon.tokenizer import Tokenizer


def by_key(outputs) -> dict[bytes, list[dict]]:
    out: dict[bytes, list[dict]] = defaultdict(list)
    for o in sorted(outputs, key=lambda o: (o.value["offset"], o.value["index"])):
        out[o.key].append(o.value)
    return out


def model_space(model: BundleModel, raw: np.ndarray) -> np.ndarray:
    spec = model.spec.input
    return ((raw - np.array(spec.mean or 0.0)) / np.array(spec.std or 1.0)).astype(np.float32)


def values(model: BundleModel, v: dict) -> np.ndarray:
    return np.array([v[n] for n in model.spec.output.names])


def test_controls_warmup_and_forecast(bootstrap, topic_factory, recipe_bundle, tmp_path):
    bundle = recipe_bundle("sensors")
    model = BundleModel(bundle)
    spec = model.spec
    rng = np.random.default_rng(5)
    mean, std = np.array(spec.input.mean), np.array(spec.input.std)
    raw = {k: mean + std * rng.standard_normal((30, 8)) for k in ("a", "b", "c", "w")}
    items = []
    items += [(b"a", {"x": r.tolist()}) for r in raw["a"][:5]]
    items += [(b"a", {"control": "reset"})] + [(b"a", {"x": r.tolist()}) for r in raw["a"][5:9]]
    items += [(b"b", {"x": raw["b"][:3].tolist(), "control": "end"})]  # end applies after the steps
    items += [(b"b", {"x": r.tolist()}) for r in raw["b"][3:5]]
    items += [(b"c", {"x": raw["c"][:2].tolist()}), (b"c", {"control": "reset", "x": raw["c"][2:4].tolist()})]
    items += [(b"w", {"x": raw["w"][:25].tolist(), "event_time": "2026-11-21T10:00:00Z", "client_id": "probe"})]
    topic_in, topic_out = topic_factory("ctl-in", 4), topic_factory("ctl-out", 4)
    produce(bootstrap, topic_in, items)
    expected = 5 + 4 + 3 + 2 + 2 + 2 + 25
    horizon = 3
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--forecast-horizon", str(horizon),
                       log_dir=tmp_path) as d:
        d.start()
        out = by_key(consume(bootstrap, topic_out, expected, timeout=60, settle=0.5))
        assert d.metric("rnnd_stream_ends_total") == 1
        assert d.stop() == 0
    assert sum(len(v) for v in out.values()) == expected

    def reference(seq: np.ndarray) -> tuple[np.ndarray, list]:
        y, _ = model.run_sequence(model_space(model, seq)[None], chunk=1)
        return y[0], []

    def check(outs: list[dict], seq: np.ndarray) -> None:
        y, _ = reference(seq)
        got = np.stack([(values(model, v["prediction"]["values"]) - mean) / std for v in outs])
        assert np.max(np.abs(got - y)) <= 1e-4
        assert [v["step"] for v in outs] == list(range(len(seq)))

    # reset: the steps after it start from the initial state again
    check(out[b"a"][:5], raw["a"][:5])
    check(out[b"a"][5:], raw["a"][5:9])
    # end after the message's steps; the next message starts a new stream
    check(out[b"b"][:3], raw["b"][:3])
    check(out[b"b"][3:], raw["b"][3:5])
    # reset in the same message applies before its steps
    check(out[b"c"][:2], raw["c"][:2])
    check(out[b"c"][2:], raw["c"][2:4])
    # warm-up flags and echoed fields
    w = out[b"w"]
    assert [v["warmup"] for v in w] == [s < spec.warmup_steps for s in range(25)]
    assert all(v["event_time"] == "2026-11-21T10:00:00Z" and v["client_id"] == "probe" for v in w)
    # forecasts: step t's own prediction, then the model rolled ahead on a copy of the state,
    # feeding its predictions back — computed here independently, one ONNX call at a time.
    x = model_space(model, raw["w"][:25])[None]
    state = model.initial_state(1)
    for t in range(25):
        y, state = model.run(x[:, t:t + 1], state)
        fc = w[t]["prediction"]["forecast"]
        assert len(fc) == horizon
        np.testing.assert_allclose(values(model, fc[0]), values(model, w[t]["prediction"]["values"]), rtol=1e-6)
        roll, s2 = y[:, 0], [a.copy() for a in state]
        for h in range(1, horizon):
            nxt = ((roll * std + mean - mean) / std).astype(np.float32)[:, None, :]
            yy, s2 = model.run(nxt, s2)
            roll = yy[:, 0]
            got = (values(model, fc[h]) - mean) / std
            assert np.max(np.abs(got - roll[0])) <= 1e-4


def test_ttl_and_lru_eviction(bootstrap, topic_factory, recipe_bundle, tmp_path):
    bundle = recipe_bundle("product")
    topic_in, topic_out = topic_factory("evict-in", 2), topic_factory("evict-out", 2)
    produce(bootstrap, topic_in, [(f"k{i}".encode(), {"x": [0.5]}) for i in range(30)])
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--max-streams", "20", "--stream-ttl-s", "2",
                       log_dir=tmp_path) as d:
        d.start()
        consume(bootstrap, topic_out, 30, timeout=30)
        assert d.metric("rnnd_evictions_total", reason="lru") >= 10
        assert d.metric("rnnd_active_streams") == 20
        # Idle for longer than the TTL: every stream goes.
        deadline = time.monotonic() + 15
        while d.metric("rnnd_evictions_total", reason="ttl") < 20 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert d.metric("rnnd_evictions_total", reason="ttl") == 20
        assert d.metric("rnnd_active_streams") == 0
        assert "evicted" in d.log()
        # An evicted stream comes back from its initial state: step 0 again.
        produce(bootstrap, topic_in, [(b"k0", {"x": [0.25]})])
        outs = consume(bootstrap, topic_out, 31, timeout=30)
        assert d.stop() == 0
    k0 = [o.value for o in outs if o.key == b"k0"]
    assert [v["step"] for v in k0] == [0, 0]


def test_generation_and_token_dead_letters(bootstrap, topic_factory, recipe_bundle, tmp_path):
    bundle = recipe_bundle("charlm")
    model = BundleModel(bundle)
    tok = Tokenizer(model.spec.input.tokenizer)
    vocab = model.spec.output.vocab
    topic_in, topic_out = topic_factory("gen-in", 2), topic_factory("gen-out", 2)
    bad = [(b"s", {"tokens": [0, len(vocab)]}), (b"s", {"text": "a" * 40}), (b"s", {"x": [1.0]})]
    produce(bootstrap, topic_in, [(b"s", {"text": "the quick"}), *bad, (b"s", {"text": " fox"})])
    n_gen = 4
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--generate-tokens", str(n_gen),
                       "--max-text-tokens", "32", "--top-k", "3", log_dir=tmp_path) as d:
        d.start()
        outs = by_key(consume(bootstrap, topic_out, 13, timeout=60, settle=0.5))[b"s"]
        dead = consume(bootstrap, f"{topic_in}.dlq", 3, timeout=30)
        assert d.stop() == 0
    ids = np.concatenate([tok.encode("the quick"), tok.encode(" fox")])[None]
    assert len(outs) == ids.shape[1]
    state = model.initial_state(1)
    for t in range(ids.shape[1]):
        y, state = model.run(ids[:, t:t + 1], state)
        # greedy roll-out from a copy of the state, computed here one call at a time
        cur, s2, picked = y[:, 0], [a.copy() for a in state], []
        for i in range(n_gen):
            nxt = int(cur.argmax())
            picked.append(nxt)
            if i + 1 < n_gen:
                yy, s2 = model.run(np.array([[nxt]], dtype=np.int64), s2)
                cur = yy[:, 0]
        pred = outs[t]["prediction"]
        assert pred["generated_ids"] == picked
        assert pred["generated"] == "".join(vocab[i] for i in picked)
        assert [n["token"] for n in pred["next"]] == [vocab[i] for i in np.argsort(-y[0, 0])[:3]]
    assert sorted(r.value["reason"] for r in dead) == ["text_too_long", "token_out_of_range", "wrong_input_kind"]


def test_dead_letters_leave_state_and_other_streams_untouched(bootstrap, topic_factory, recipe_bundle, tmp_path):
    bundle = recipe_bundle("delay")  # one feature "x", valid range [-1, 1]
    model = BundleModel(bundle)
    rng = np.random.default_rng(11)
    good = {f"g{i}".encode(): rng.uniform(-1, 1, size=(12, 1)) for i in range(40)}
    bad_cases = {
        "not_json": b"{not json",
        "not_object": b"[1, 2]",
        "no_key": None,
        "no_input": {"event_time": 5},
        "wrong_type": {"x": ["a"]},
        "wrong_input_kind": {"text": "hello"},
        "feature_count": {"x": [0.1, 0.2]},
        "feature_names": {"x": {"y": 0.1}},
        "non_finite": b'{"x": [NaN]}',
        "out_of_range": {"x": [3.0]},
        "too_many_steps": {"x": [[0.1]] * 9},
        "unknown_control": {"control": "pause"},
    }
    items = []
    for t in range(12):
        for k, seq in good.items():
            items.append((k, {"x": seq[t].tolist()}))
        if t < len(bad_cases):
            reason = list(bad_cases)[t]
            value = bad_cases[reason]
            key = None if reason == "no_key" else f"g{t}".encode()  # same keys as good streams
            items.append((key, value if value is not None else {"x": [0.0]}))
    topic_in, topic_out = topic_factory("dlq-in", 4), topic_factory("dlq-out", 4)
    sent = produce(bootstrap, topic_in, items)
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--max-steps-per-message", "8",
                       log_dir=tmp_path) as d:
        d.start()
        outs = by_key(consume(bootstrap, topic_out, 40 * 12, timeout=60, settle=0.5))
        dead = consume(bootstrap, f"{topic_in}.dlq", len(bad_cases), timeout=30, settle=0.5)
        assert d.http("/healthz")[0] == 200 and d.http("/readyz")[0] == 200
        for reason in bad_cases:
            assert d.metric("rnnd_dead_letters_total", reason=reason) == 1, reason
        assert d.metric("rnnd_predictions_total") == 40 * 12
        assert d.stop() == 0
    assert sorted(r.value["reason"] for r in dead) == sorted(bad_cases)
    sent_at = {(s.partition, s.offset): s for s in sent}
    for r in dead:
        v = r.value
        src = sent_at[(v["partition"], v["offset"])]
        assert base64.b64decode(v["payload_b64"]) == src.value  # the original bytes
        assert r.key == src.key and v["message"]
    for key, seq in good.items():
        y = model.run_sequence(model_space(model, seq)[None], chunk=12)[0][0]
        got = np.array([v["prediction"]["values"]["x_lag10"] for v in outs[key]])
        assert np.max(np.abs(got - y[:, 0])) <= 1e-4, key
        assert [v["step"] for v in outs[key]] == list(range(12))


def test_sigterm_drains_and_commits(bootstrap, topic_factory, recipe_bundle, tmp_path):
    bundle = recipe_bundle("product")
    topic_in, topic_out = topic_factory("term-in", 4), topic_factory("term-out", 4)
    first = [(f"k{i % 100}".encode(), {"x": [0.1]}) for i in range(3000)]
    produce(bootstrap, topic_in, first)
    group = f"g-{topic_in}"
    d = DaemonProcess(bundle, bootstrap, topic_in, topic_out, group=group, log_dir=tmp_path).start()
    consume(bootstrap, topic_out, 500, timeout=60)  # mid-stream
    assert d.stop() == 0
    log = d.log()
    assert "stopping" in log
    # A restarted daemon continues where the first one committed: nothing is emitted twice.
    produce(bootstrap, topic_in, [(b"late", {"x": [0.2]})] * 10)
    d2 = DaemonProcess(bundle, bootstrap, topic_in, topic_out, group=group, log_dir=tmp_path).start()
    outs = consume(bootstrap, topic_out, 3010, timeout=60, settle=1.0)
    assert d2.stop() == 0
    ids = [o.value["id"] for o in outs]
    assert len(ids) == len(set(ids)) == 3010


def test_trace_headers_reach_every_output_made_from_their_record(bootstrap, topic_factory, recipe_bundle,
                                                                 tmp_path):
    """W3C trace context (copy_headers' default) is copied from an input record to each of its outputs,
    a multi-step message's included, and to its dead letter beside the reason; other headers are not;
    untraced records' outputs carry none."""
    bundle = recipe_bundle("product")
    topic_in, topic_out = topic_factory("hdr-in", 2), topic_factory("hdr-out", 2)
    sent: list[tuple[bytes, dict, list[tuple[str, bytes]]]] = []
    for i in range(60):
        trace = [("traceparent", f"00-{i:032x}-{i:016x}-01".encode())] if i % 3 else []
        extra = [("tracestate", b"rnnd=t%d" % i)] if i % 5 == 1 else []
        steps = [[0.1 * (i % 7)], [0.2]] if i % 4 == 0 else [0.3]
        sent.append((f"h{i % 10}".encode(), {"x": steps}, trace + extra + [("x-other", b"not copied")]))

    async def send() -> dict[tuple[int, int], tuple[tuple[str, bytes], ...]]:
        """Each record's coordinates → the headers its outputs must carry."""
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await p.start()
        try:
            want = {}
            for key, value, headers in sent:
                md = await p.send_and_wait(topic_in, json.dumps(value).encode(), key=key, headers=headers)
                want[(md.partition, md.offset)] = tuple(h for h in headers if h[0] in ("traceparent", "tracestate"))
            return want
        finally:
            await p.stop()

    bad_trace = [("traceparent", b"00-" + b"e" * 32 + b"-" + b"f" * 16 + b"-01"), ("x-other", b"not copied")]

    async def send_bad() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await p.start()
        try:
            await p.send_and_wait(topic_in, b'{"x": [1.0, 2.0, 3.0]}', key=b"h0", headers=bad_trace)  # feature_count
        finally:
            await p.stop()

    want = asyncio.run(send())
    asyncio.run(send_bad())
    expected = sum(2 if isinstance(v["x"][0], list) else 1 for _, v, _ in sent)
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start()
        outs = consume(bootstrap, topic_out, expected, timeout=60, settle=0.5)
        dead = consume(bootstrap, f"{topic_in}.dlq", 1, timeout=30)
        assert d.stop() == 0
    assert len(outs) == expected
    assert [(dl.value["reason"], dl.headers) for dl in dead] == [
        ("feature_count", (("rnnd.reason", b"feature_count"), bad_trace[0]))]
    for o in outs:
        assert o.headers == want[(o.value["partition"], o.value["offset"])], (o.value["id"], o.headers)
    assert sum(1 for o in outs if o.headers) > expected // 2  # most records were traced: the check bites


def test_broker_unreachable_at_start_is_retried_not_fatal(recipe_bundle, tmp_path):
    bundle = recipe_bundle("product")
    dead_port = free_port()
    d = DaemonProcess(bundle, f"127.0.0.1:{dead_port}", "in", "out", log_dir=tmp_path).start(wait_ready=False)
    deadline = time.monotonic() + 20
    while d.http("/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)
    assert d.proc.poll() is None, d.log()
    assert d.http("/healthz")[0] == 200
    assert d.http("/readyz")[0] == 503
    assert d.metric("rnnd_kafka_errors_total", op="connect") >= 1
    assert d.http("/nope")[0] == 404
    assert d.stop() == 0
    assert "not reachable" in d.log() and "Traceback" not in d.log()


def test_cuda_on_a_cpu_only_install(bootstrap, topic_factory, recipe_bundle, tmp_path):
    bundle = recipe_bundle("product")
    cmd = [sys.executable, "-m", "rnnd", "serve", "--model", str(bundle), "--input-topic", "i", "--output-topic", "o",
           "--provider", "cuda", "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "provider cuda requested" in proc.stderr and "--provider-fallback" in proc.stderr
    assert "Traceback" not in proc.stderr
    topic_in, topic_out = topic_factory("gpu-in", 1), topic_factory("gpu-out", 1)
    produce(bootstrap, topic_in, [(b"k", {"x": [0.3]})])
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--provider", "cuda:1", "--provider-fallback",
                       log_dir=tmp_path) as d:
        d.start()
        assert len(consume(bootstrap, topic_out, 1, timeout=30)) == 1
        info = {dict(labels)["requested_provider"]: (dict(labels), v) for (name, labels), v in d.metrics().items()
                if name == "rnnd_model_info"}
        labels, value = info["cuda:1"]
        assert value == 1 and labels["provider"] == "cpu" and labels["fallback"] == "true"
        assert d.stop() == 0
        assert "FALLING BACK" in d.log()


def test_config_file_and_env(bootstrap, topic_factory, recipe_bundle, tmp_path):
    """The same settings from a TOML file and RNND_* variables (flags win over both)."""
    bundle = recipe_bundle("product")
    topic_in, topic_out = topic_factory("cfg-in", 1), topic_factory("cfg-out", 1)
    cfg = tmp_path / "rnnd.toml"
    cfg.write_text(f'model = "{bundle}"\ninput_topic = "{topic_in}"\noutput_topic = "wrong"\nemit = "every:2"\n')
    produce(bootstrap, topic_in, [(b"k", {"x": [[0.1], [0.2], [0.3], [0.4]]})])
    d = DaemonProcess(bundle, bootstrap, topic_in, topic_out, "--config", str(cfg), log_dir=tmp_path,
                      env={"RNND_OUTPUT_TOPIC": "also-wrong", "RNND_TOP_K": "2"})
    with d:
        d.start()
        outs = consume(bootstrap, topic_out, 2, timeout=30, settle=1.0)
        assert d.stop() == 0
    assert [o.value["step"] for o in outs] == [1, 3]  # emit every 2nd step, from the file
    assert json.loads(outs[0].raw)["model"] == "product@1"


def test_random_initial_state_same_key_same_start_across_a_restart_and_in_verify(bootstrap, topic_factory,
                                                                                  recipe_bundle, rnnd, tmp_path):
    """The product recipe exported with --random-init: each stream starts from its key's draw. After
    a restart, the same streams reset and fed the same inputs predict exactly what they predicted
    before (the draw is the key's and the seed's, not the process's); verify recomputes all of it."""
    trained = recipe_bundle("product")
    bundle = tmp_path / "product-random.onnx"
    res = rnnd("export", "--checkpoint", trained.with_suffix(".pt"), "--out", bundle, "--random-init", "normal:0.7",
               "--random-init-seed", "5", "--quiet")
    assert res.code == 0, res.err
    assert BundleModel(bundle).spec.states[0].init == "random"
    topic_in, topic_out = topic_factory("rand-in", 2), topic_factory("rand-out", 2)
    rng = np.random.default_rng(3)
    inputs = {f"r{i}".encode(): rng.uniform(-1, 1, (4, 1)).round(5).tolist() for i in range(20)}
    produce(bootstrap, topic_in, [(k, {"x": x}) for k, x in inputs.items()])
    group = "rand-group"
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, group=group, log_dir=tmp_path) as d:
        d.start()
        consume(bootstrap, topic_out, 80, timeout=60)
        assert d.stop() == 0
    produce(bootstrap, topic_in, [(k, {"control": "reset", "x": x}) for k, x in inputs.items()])
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, group=group, log_dir=tmp_path) as d:
        d.start()
        outs = by_key(consume(bootstrap, topic_out, 160, timeout=60, settle=0.5))
        assert d.stop() == 0
    for key, docs in outs.items():
        assert [o["step"] for o in docs] == [0, 1, 2, 3] * 2, key
        first, again = ([o["prediction"]["values"] for o in docs[h:h + 4]] for h in (0, 4))
        assert first == again, key
    assert len({json.dumps(d[0]["prediction"]) for d in outs.values()}) == 20  # each key its own start
    code, report = subprocess_verify(bundle, bootstrap, topic_in, topic_out)
    assert code == 0 and report["ok"] and report["missing"] == report["wrong"] == 0, report
    assert report["expected"] == report["received"] == 160, report


def subprocess_verify(bundle, bootstrap: str, topic_in: str, topic_out: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "rnnd", "verify", "--model", str(bundle), "--bootstrap-servers",
                           bootstrap, "--input-topic", topic_in, "--output-topic", topic_out, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_streams_start_from_a_context_on_the_broker_and_verify_recomputes_them(bootstrap, topic_factory, tmp_path):
    """A captioning-shaped bundle served: captions start from their image's context (in the first
    message, or a control-only start), a bad context is dead-lettered; verify finds every
    prediction equal to its own recomputation from init(context)."""
    import torch

    from rnnd.daemon.bundle import InputSpec, OutputSpec, TokenizerSpec
    from rnnd.export.exporter import ExportOptions, export_bundle
    from rnnd.export.parity import ParityPlan
    from user_models import Captioner

    torch.manual_seed(3)
    vocab = ("<pad>", "<unk>", *(f"w{i}" for i in range(10)))
    bundle = tmp_path / "cap.onnx"
    export_bundle(Captioner(vocab_size=len(vocab), context_size=4).eval(), ExportOptions(
        name="cap", input=InputSpec("tokens", tokenizer=TokenizerSpec("word", vocab, unk_id=1, pad_id=0)),
        output=OutputSpec("language_model", vocab=vocab), context_size=4,
        parity=ParityPlan(batches=(1, 3), chunks=(1,), steps=8)), bundle)
    topic_in, topic_out = topic_factory("ctx-in", 2), topic_factory("ctx-out", 2)
    rng = np.random.default_rng(4)
    items: list = []
    for i in range(12):
        key = f"img{i}".encode()
        context = rng.standard_normal(4).round(4).tolist()
        if i % 3 == 0:
            items += [(key, {"control": "start", "context": context}), (key, {"text": "w1 w2 w3"})]
        else:
            items += [(key, {"context": context, "text": "w4 w5"}), (key, {"text": "w6"})]
    items.append((b"bad", {"context": [1.0, 2.0], "text": "w1"}))
    produce(bootstrap, topic_in, items)
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, log_dir=tmp_path) as d:
        d.start()
        consume(bootstrap, topic_out, 36, timeout=60)
        dead = consume(bootstrap, f"{topic_in}.dlq", 1, timeout=30)
        assert d.stop() == 0
    assert [r.value["reason"] for r in dead] == ["bad_context"]
    code, report = subprocess_verify(bundle, bootstrap, topic_in, topic_out)
    assert code == 0 and report["ok"] and report["expected"] == report["received"] == 36, report


@pytest.mark.brokers("tansu", "kafka")
def test_seq2seq_answers_on_the_broker_survive_a_kill_and_verify_recomputes_them(broker_kind, bootstrap,
                                                                                  topic_factory, recipe_bundle,
                                                                                  tmp_path):
    """The reverse recipe served with beam search: a backlog of 400 messages over 80 keys, the daemon
    killed (SIGKILL) mid-way and restarted; every message is answered, each stream's answers in input
    order, and verify finds each answer equal to the message decoded alone. On Tansu at least once (a
    crash repeats the answers not yet committed, identically); on Apache Kafka exactly once: answers in
    flight at a checkpoint are not part of its transaction, and a read_committed reader sees each once."""
    guarantee = "exactly_once" if broker_kind == "kafka" else "at_least_once"
    bundle = recipe_bundle("reverse")
    rng = np.random.default_rng(11)
    texts = ["".join(rng.choice(list("abcdefghijkl"), size=int(rng.integers(3, 11)))) for _ in range(400)]
    topic_in, topic_out = topic_factory("s2s-in", 4), topic_factory("s2s-out", 4)
    items: list = [(f"user{i % 80}".encode(), {"text": t}) for i, t in enumerate(texts)]
    items.append((b"long", {"text": "a" * 300}))  # past the bundle's max_source_len: a dead letter
    produce(bootstrap, topic_in, items)
    # the restart waits for the killed member's session to expire: as short as each broker allows
    session = "6000" if broker_kind == "kafka" else "3000"
    flags = ("--beam-size", "2", "--commit-interval-s", "0.2", "--max-batch", "64", "--session-timeout-ms", session,
             "--processing-guarantee", guarantee)
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, *flags, log_dir=tmp_path) as d:
        d.start()
        consume(bootstrap, topic_out, 100, timeout=60, settle=0)
        d.kill()
    with DaemonProcess(bundle, bootstrap, topic_in, topic_out, *flags, log_dir=tmp_path) as d:
        d.start()
        outputs = consume(bootstrap, topic_out, 400, timeout=90, settle=1.0)
        dead = consume(bootstrap, f"{topic_in}.dlq", 1, timeout=30)
        assert d.stop() == 0
    assert {(r.key, r.value["reason"]) for r in dead} == {(b"long", "too_many_steps")}  # repeated by the crash, maybe
    answers = {}
    for o in outputs:
        answers.setdefault(o.value["id"], o.value)
        assert answers[o.value["id"]]["prediction"] == o.value["prediction"]  # a repeat is identical
    assert len(answers) == 400
    words = set(texts)
    assert sum(a["prediction"]["output"][::-1] in words for a in answers.values()) >= 0.95 * 400
    seen: dict[bytes, list[int]] = defaultdict(list)  # per key, the offsets of its answers as they arrived
    for o in outputs:  # one key lives in one partition: its outputs arrive in the order they were written
        if o.value["offset"] not in seen[o.key]:
            seen[o.key].append(o.value["offset"])
    assert all(offsets == sorted(offsets) for offsets in seen.values())
    proc = subprocess.run([sys.executable, "-m", "rnnd", "verify", "--model", str(bundle), "--bootstrap-servers",
                           bootstrap, "--input-topic", topic_in, "--output-topic", topic_out, "--beam-size", "2",
                           "--processing-guarantee", guarantee, "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] and report["expected"] == 400 and not report["missing"], report
    if guarantee == "exactly_once":
        assert report["duplicated"] == 0 and report["received"] == 400, report
