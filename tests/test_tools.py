"""`rnnd produce` and `rnnd tail` against the real (embedded) broker.

The commands are run through a parser built only with ``rnnd.tools.add_parsers``, so these
tests do not depend on how ``rnnd.cli`` wires them, yet exercise the real argument parsing.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from kafka_fixtures import TopicFactory, run_async

from rnnd import tools
from rnnd.daemon.bundle import BundleSpec, InputSpec, ModelInfo, OutputSpec, StateSpec
from rnnd.daemon.codec import Decoder, Record
from rnnd.daemon.config import ServeConfig

#: Every broker test here runs on Tansu and on Apache Kafka (tests/conftest.py).
BROKERS = ("tansu", "kafka")
EXAMPLES = Path(__file__).parent.parent / "schemas" / "examples"
Capsys = pytest.CaptureFixture[str]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnd")
    sub = p.add_subparsers(dest="command", required=True)
    tools.add_parsers(sub)
    return p


def run(*argv: Any) -> int:
    args = parser().parse_args([str(a) for a in argv])
    return int(args.run(args))


async def _consume(bootstrap: str, topic: str, n: int, partitions: int,
                   timeout_s: float = 20.0) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        got: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got += [(r.key, r.value) for r in records]
        return got
    finally:
        await consumer.stop()


def consume(bootstrap: str, topic: str, n: int, partitions: int = 1) -> list[tuple[bytes, bytes]]:
    """The first ``n`` records of ``topic`` (in partition order when it has several)."""
    return run_async(_consume(bootstrap, topic, n, partitions))


async def _send(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def send(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    run_async(_send(bootstrap, topic, records))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- produce --------------------------------------------------------------------------------

def test_produce_csv_named_features(tmp_path: Path, bootstrap: str, topic_factory: TopicFactory,
                                    capsys: Capsys) -> None:
    topic = topic_factory("produce-csv", partitions=2)
    f = tmp_path / "readings.csv"
    f.write_text("device,temp,humidity,pressure,event_time\n"
                 "s1,21.3,51.2,1013.2,1763719200000\n"
                 "s2,19.0,60.5,1009.9,1763719200100\n"
                 "\n"
                 "s1,21.4,51.0,1013.1,\n")
    assert run("produce", f, "--topic", topic, "--bootstrap-servers", bootstrap, "--key-column", "device") == 0
    assert "sent 3 messages" in capsys.readouterr().err
    got = sorted(consume(bootstrap, topic, 3, partitions=2))
    assert [k for k, _ in got] == [b"s1", b"s1", b"s2"]
    values = {orjson.dumps(orjson.loads(v)) for _, v in got}
    assert orjson.dumps({"x": {"temp": 21.3, "humidity": 51.2, "pressure": 1013.2}, "event_time": 1763719200000}) \
        in values
    assert orjson.dumps({"x": {"temp": 21.4, "humidity": 51.0, "pressure": 1013.1}}) in values
    # What produce writes is what the daemon reads: every message decodes into one step.
    spec = BundleSpec(model=ModelInfo("weather", "1"), mode="stateful",
                      input=InputSpec("numeric", features=("temp", "humidity", "pressure")),
                      output=OutputSpec("regression", names=("temp",)),
                      states=(StateSpec("h", (1, 8), 0, "h_in", "h_out"),))
    decoder = Decoder(spec, ServeConfig(), topic)
    for i, (k, v) in enumerate(got):
        item = decoder.decode(k, v, 0, i, 0)
        assert isinstance(item, Record) and len(item.steps) == 1


def test_produce_csv_features_subset_and_limit(tmp_path: Path, bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory("produce-subset", partitions=1)
    f = tmp_path / "data.txt"
    f.write_text("a,b,id,c\n1,2,k,3\n4,5,k,6\n7,8,k,9\n")
    assert run("produce", f, "--format", "csv", "--topic", topic, "--bootstrap-servers", bootstrap,
               "--key-column", "id", "--features", "c,a", "--limit", "2") == 0
    got = consume(bootstrap, topic, 2)
    assert [json.loads(v) for _, v in got] == [{"x": {"c": 3.0, "a": 1.0}}, {"x": {"c": 6.0, "a": 4.0}}]
    assert list(json.loads(got[0][1])["x"]) == ["c", "a"]  # the order --features gives


def test_produce_csv_text_column(tmp_path: Path, bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory("produce-text", partitions=1)
    f = tmp_path / "chat.csv"
    f.write_text('user,text\nu1,"the cat, the mat"\nu2,hello\n')
    assert run("produce", f, "--topic", topic, "--bootstrap-servers", bootstrap, "--key-column", "user") == 0
    got = consume(bootstrap, topic, 2)
    assert got == [(b"u1", orjson.dumps({"text": "the cat, the mat"})), (b"u2", orjson.dumps({"text": "hello"}))]


def test_produce_jsonl_sends_lines_as_they_are(tmp_path: Path, bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory("produce-jsonl", partitions=1)
    lines = [
        {"stream": "a", "x": [1.0, 2.0, 3.0], "event_time": "t0"},
        {"stream": "a", "x": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]},
        {"stream": 42, "tokens": [2, 3, 4]},
        {"stream": "b", "text": "the cat", "client_id": "c1"},
        {"stream": "a", "control": "end"},
    ]
    f = tmp_path / "steps.jsonl"
    f.write_text("\n".join(json.dumps(d) for d in lines) + "\n\n")
    assert run("produce", f, "--topic", topic, "--bootstrap-servers", bootstrap, "--key-column", "stream") == 0
    got = consume(bootstrap, topic, len(lines))
    assert [k for k, _ in got] == [b"a", b"a", b"42", b"b", b"a"]
    expected = [{k: v for k, v in d.items() if k != "stream"} for d in lines]
    assert [json.loads(v) for _, v in got] == expected


def test_produce_keeps_non_finite_values_for_the_daemon_to_judge(tmp_path: Path, bootstrap: str,
                                                                  topic_factory: TopicFactory) -> None:
    topic = topic_factory("produce-nan", partitions=1)
    f = tmp_path / "nan.csv"
    f.write_text("k,v\ns,nan\n")
    assert run("produce", f, "--topic", topic, "--bootstrap-servers", bootstrap, "--key-column", "k") == 0
    [(_, value)] = consume(bootstrap, topic, 1)
    assert value == b'{"x":{"v":NaN}}'  # not null: the daemon's non_finite setting decides


def test_produce_rate_limit(tmp_path: Path, bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory("produce-rate", partitions=1)
    f = tmp_path / "many.csv"
    f.write_text("k,v\n" + "".join(f"s{i % 7},{i}\n" for i in range(200)))
    t0 = time.monotonic()
    assert run("produce", f, "--topic", topic, "--bootstrap-servers", bootstrap, "--key-column", "k",
               "--rate", "400") == 0
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.35, f"200 messages at 400/s took only {elapsed:.2f} s"
    assert elapsed < 10
    assert len(consume(bootstrap, topic, 200)) == 200


def test_token_bucket_sleeps_per_batch_not_per_message() -> None:
    now = [0.0]
    bucket = tools.TokenBucket(10_000, clock=lambda: now[0])
    waits = [bucket.take() for _ in range(1000)]  # no time passes: all sent "at once"
    assert waits[0] == 0.0
    assert waits[-1] == pytest.approx((1000 - bucket.capacity) / 10_000)
    sleeps = sum(1 for w in waits if w >= tools.MIN_SLEEP_S)
    assert sleeps < len(waits)  # below MIN_SLEEP_S of debt the sender does not sleep
    now[0] += 10.0
    assert bucket.take() == 0.0  # the debt is paid off by time passing; the burst is capped


@pytest.mark.parametrize(("setup", "extra", "expect", "early"), [
    (None, (), "no such file", True),
    ("device,temp\ns1,1\n", (), "no key column 'id'", True),
    ("id,temp\ns1,1\n", ("--features", "temp,hum"), "--features names columns not in the header: hum", True),
    ("id,temp,text\ns1,1,hi\n", (), "text or numeric features, not both", True),
    ("id,temp\ns1,\n", (), "line 2: column 'temp' is '', not a number (write nan for a missing value)", True),
    ("id,temp\ns1,1\ns2,warm\n", (), "line 3: column 'temp' is 'warm', not a number", False),
    ("id,temp\ns1,1\ns2\n", (), "line 3: 1 fields, but the header has 2", False),
    ("id,temp\ns1,1\n,2\n", (), "line 3: the key column 'id' is empty", False),
])
def test_produce_errors_csv(tmp_path: Path, capsys: Capsys, bootstrap: str, topic_factory: TopicFactory,
                            setup: str | None, extra: tuple[str, ...], expect: str, early: bool) -> None:
    f = tmp_path / "in.csv"
    if setup is not None:
        f.write_text(setup)
    # Errors in the header or the first row must fail before connecting: give them a broker
    # address nothing listens on, so a connection attempt would show as a different error.
    servers = "127.0.0.1:1" if early else bootstrap
    topic = "never-created" if early else topic_factory("produce-bad-csv", partitions=1)
    code = run("produce", f, "--topic", topic, "--bootstrap-servers", servers, "--key-column", "id", *extra)
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("rnnd produce: error: ") and expect in line, line


@pytest.mark.parametrize(("text", "expect"), [
    ('{"id": "a", "x": [1]}\n{"x": [2]}\n', "line 2: no key field 'id'"),
    ('{"id": "a", "x": [1]}\n\n{"id": "a", "x": [1]\n', "line 3: not JSON"),
    ('[1, 2]\n', "line 1: a JSON list, not an object"),
    ('{"id": null, "x": [1]}\n', "line 1: the key 'id' must be a non-empty string or an integer"),
])
def test_produce_errors_jsonl(tmp_path: Path, capsys: Capsys, bootstrap: str, topic_factory: TopicFactory, text: str,
                              expect: str) -> None:
    topic = topic_factory("produce-bad", partitions=1)
    f = tmp_path / "in.jsonl"
    f.write_text(text)
    assert run("produce", f, "--topic", topic, "--bootstrap-servers", bootstrap, "--key-column", "id") != 0
    err = capsys.readouterr().err
    assert expect in one_line(err), err


def test_produce_unknown_extension(tmp_path: Path, capsys: Capsys) -> None:
    f = tmp_path / "data.parquet"
    f.write_text("")
    assert run("produce", f, "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--key-column", "k") == 2
    assert "--format" in one_line(capsys.readouterr().err)


def test_produce_unreachable_broker(tmp_path: Path, capsys: Capsys) -> None:
    f = tmp_path / "ok.csv"
    f.write_text("k,v\na,1\n")
    assert run("produce", f, "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--key-column", "k") == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in one_line(capsys.readouterr().err)


# --- tail -----------------------------------------------------------------------------------

def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def write_examples(bootstrap: str, topic: str, names: list[str], key: str | None = None) -> None:
    docs = [example(n) for n in names]
    if key is not None:
        docs = [dict(d, key=key) for d in docs]
    send(bootstrap, topic, [(d["key"].encode(), orjson.dumps(d)) for d in docs])


def test_format_prediction_kinds() -> None:
    assert tools.format_prediction(example("output-regression")) == \
        "sensor-17 step 118 -> temp=21.30 humidity=51.49 pressure=1013"
    assert tools.format_prediction(example("output-regression-warmup")).startswith("sensor-42 step 2 [warmup] -> ")
    assert tools.format_prediction(example("output-regression-forecast")) == (
        "sensor-17 step 119 -> temp=21.35 humidity=51.39 pressure=1013 | forecast: "
        "h1 temp=21.35 humidity=51.39 pressure=1013, h3 temp=21.49 humidity=51.02 pressure=1013")
    assert tools.format_prediction(example("output-classification")) == "machine-A3 step 2047 -> normal (p=0.93)"
    assert tools.format_prediction(example("output-classification-ended")) == \
        "session-9f2c step 41 [ended] -> purchase (p=0.77)"
    assert tools.format_prediction(example("output-language-model")) == \
        "user-381 step 5 -> next: . 0.41, and 0.20, the 0.09, on 0.05, <unk> 0.04"
    assert tools.format_prediction(example("output-language-model-generated")) == \
        'user-381 step 6 -> next: the 0.33, a 0.18, cat 0.06 | generated: "the cat sat on the"'


@pytest.mark.parametrize(("value", "text"), [
    (21.3046, "21.30"), (51.4873, "51.49"), (1013.1592, "1013"), (0.012345, "0.01235"), (-3.14159, "-3.142"),
    (0.0, "0"), (123456.7, "123457"), (1.5e-7, "1.5e-07"), (2.5e9, "2.5e+09"), (None, "nan"), (7, "7.000"),
])
def test_format_value(value: Any, text: str) -> None:
    assert tools.format_value(value) == text


def test_tail_from_beginning_with_key_filter_and_limit(bootstrap: str, topic_factory: TopicFactory,
                                                       capsys: Capsys) -> None:
    topic = topic_factory("tail", partitions=3)
    write_examples(bootstrap, topic, ["output-regression", "output-regression-warmup", "output-classification",
                                      "output-regression-forecast", "output-language-model"])
    capsys.readouterr()
    assert run("tail", "--topic", topic, "--bootstrap-servers", bootstrap, "--from-beginning",
               "--key", "sensor-17", "--limit", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "sensor-17 step 118 -> temp=21.30 humidity=51.49 pressure=1013",
        "sensor-17 step 119 -> temp=21.35 humidity=51.39 pressure=1013 | forecast: "
        "h1 temp=21.35 humidity=51.39 pressure=1013, h3 temp=21.49 humidity=51.02 pressure=1013",
    ]

    assert run("tail", "--topic", topic, "--bootstrap-servers", bootstrap, "--from-beginning",
               "--key", "machine-A3", "--key", "user-381", "--limit", "2", "--json") == 0
    raw = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(d["key"] for d in raw) == ["machine-A3", "user-381"]
    assert {d["id"] for d in raw} == {example("output-classification")["id"], example("output-language-model")["id"]}


def test_tail_starts_at_the_end(bootstrap: str, topic_factory: TopicFactory, capsys: Capsys) -> None:
    """Without --from-beginning only new predictions print, although Tansu's end offsets are wrong."""
    topic = topic_factory("tail-end", partitions=2)
    # Several old records per key, sent in one batch: Tansu's wrong end offset (first offset
    # of the newest batch + 1) would fall inside it and replay old ones.
    write_examples(bootstrap, topic, ["output-regression"] * 5 + ["output-classification"] * 5)
    capsys.readouterr()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(
        run("tail", "--topic", topic, "--bootstrap-servers", bootstrap, "--limit", "3")))
    t.start()
    deadline = time.monotonic() + 30
    while t.is_alive() and time.monotonic() < deadline:
        write_examples(bootstrap, topic, ["output-language-model"])
        t.join(0.3)
    assert not t.is_alive(), "tail did not exit after --limit new predictions"
    assert result == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("user-381 step 5 -> next: ") for line in lines), lines


def test_tail_unknown_topic_is_an_error_not_a_new_topic(bootstrap: str, capsys: Capsys) -> None:
    name = f"no-such-topic-{time.time_ns()}"
    assert run("tail", "--topic", name, "--bootstrap-servers", bootstrap, "--limit", "1") == 2
    assert f"topic {name!r} does not exist" in one_line(capsys.readouterr().err)

    async def topics() -> set[str]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await c.start()
        try:
            return set(await c.topics())
        finally:
            await c.stop()

    assert name not in run_async(topics())
