"""Several routes in one `rnnd serve`: each input topic served by its own bundle, and a shadow route.

The configuration's rules are checked on their own; one daemon process then serves two routes
and a shadow (plus a shadow whose bundle is missing) on a real broker, each output topic against
its own bundle's step-by-step reference.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import DaemonProcess, consume, free_port, produce

from rnnd.daemon import config
from rnnd.daemon.errors import ConfigError
from rnnd.daemon.runtime import BundleModel

TOP = 'bootstrap_servers = "localhost:9092"\ncommit_interval_s = 0.5\n'
ROUTE_A = '[routes.a]\nmodel = "a.onnx"\ninput_topic = "in1"\noutput_topic = "out1"\n'
ROUTE_B = '[routes.b]\nmodel = "b.onnx"\ninput_topic = "in2"\noutput_topic = "out2"\nmax_batch = 64\n'
SHADOW = '[routes.s]\nmodel = "s.onnx"\ninput_topic = "in1"\noutput_topic = "out-s"\nshadow = true\n'


def write(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text("\n".join((TOP, *tables)))
    return path


def test_each_route_is_the_top_level_settings_and_its_own_table(tmp_path: Path) -> None:
    routes = config.load_routes(env={}, config_file=write(tmp_path, ROUTE_A, ROUTE_B, SHADOW))
    assert list(routes) == ["a", "b", "s"]
    a, b, s = routes.values()
    assert (a.model, a.input_topic, a.output_topic, a.group_id, a.dlq_topic) == ("a.onnx", "in1", "out1", "rnnd-a",
                                                                                 "in1.dlq")
    assert b.max_batch == 64 and a.max_batch == 1024  # a route's own table
    assert a.commit_interval_s == b.commit_interval_s == s.commit_interval_s == 0.5  # the top level, shared
    assert s.shadow and s.group_id == "rnnd-s" and s.dlq_topic == "in1.s.dlq"  # its dead letters kept apart
    # A flag applies to every route, below each route's own table.
    flagged = config.load_routes({"max_batch": 8}, env={}, config_file=write(tmp_path, ROUTE_A, ROUTE_B))
    assert flagged["a"].max_batch == 8 and flagged["b"].max_batch == 64
    # One route alone: what rnnd verify (and rnnd serve --route) takes.
    one = config.load({"route": "b"}, env={}, config_file=write(tmp_path, ROUTE_A, ROUTE_B))
    assert (one.route, one.model, one.group_id) == ("b", "b.onnx", "rnnd-b")
    assert config.load_routes({"route": "b"}, env={}, config_file=write(tmp_path, ROUTE_A, ROUTE_B)) == {}


@pytest.mark.parametrize(("tables", "message"), [
    ((ROUTE_A + "http_port = 9200\n",), r"\[routes.a\] sets http_port: a setting of the whole process; set it at "
                                        r"the top level of the file"),
    ((ROUTE_A, ROUTE_B.replace('"out2"', '"out1"')), r"routes a and b have the same output_topic 'out1'"),
    ((ROUTE_A, ROUTE_B + 'group_id = "rnnd-a"\n'), r"routes a and b have the same group_id 'rnnd-a'"),
    ((ROUTE_A, SHADOW.replace('"in1"', '"in9"')), r"shadow route s reads 'in9', which no other route serves"),
    ((SHADOW,), r"every route is a shadow"),
    ((ROUTE_A + "colour = 1\n",), r"\[routes.a\]: unknown setting 'colour'"),
    ((ROUTE_A.replace("routes.a", "routes.'a b'"),), r"route name 'a b' must be 1-100 letters"),
    (("workers = 2\n" + ROUTE_A,), r"workers must be 1 with routes"),
])
def test_routes_that_cannot_work_together_are_refused(tmp_path: Path, tables: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load_routes(env={}, config_file=write(tmp_path, *tables))


def test_a_command_of_one_route_must_name_it_and_shadow_needs_routes(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE_A, ROUTE_B)
    with pytest.raises(ConfigError, match=r"has routes \(a, b\): this command takes one, --route NAME"):
        config.load(env={}, config_file=path)
    with pytest.raises(ConfigError, match=r"route 'c' is not one of .*routes \(a, b\)"):
        config.load({"route": "c"}, env={}, config_file=path)
    with pytest.raises(ConfigError, match="shadow is for a route of a config file"):
        config.load({"model": "m.onnx", "input_topic": "i", "output_topic": "o", "shadow": True}, env={})


# --- one process, several routes, on a broker --------------------------------------------------------


def routes_daemon(path: Path, bootstrap: str, tmp_path: Path, **tables: str) -> DaemonProcess:
    """``rnnd serve --config path``, the file the given [routes.NAME] tables under the top level the tests share."""
    path.write_text(f'bootstrap_servers = "{bootstrap}"\ncommit_interval_s = 0.5\nsession_timeout_ms = 6000\n'
                    + tables.pop("top", "") + "".join(f"[routes.{n}]\n{t}" for n, t in tables.items()))
    d = DaemonProcess(Path("unused.onnx"), bootstrap, "unused-in", "unused-out", log_dir=tmp_path)
    d.args = [sys.executable, "-m", "rnnd", "serve", "--config", str(path), "--http-host", "127.0.0.1",
              "--http-port", str(d.port)]
    return d


def reference(model: BundleModel, xs: list[float]) -> np.ndarray:
    y, _ = model.run_sequence(np.array(xs, dtype=np.float32)[None, :, None], chunk=1)
    return y[0, :, 0]


def test_two_routes_and_a_shadow_in_one_daemon(bootstrap, topic_factory, upgrade_bundles, recipe_bundle,
                                               tmp_path) -> None:
    """Route a (product v1) and route b (moving average) on their own topics, shadow s (product v2) on
    a's input, and a shadow whose bundle is missing (not started; the others serve). Every output
    topic holds one prediction per input step, each its own bundle's; metrics carry the route."""
    v1, v2, _ = upgrade_bundles
    mavg = recipe_bundle("moving_average")
    in1, out1, in2, out2, out_s, out_t = (topic_factory(n, 2) for n in ("r-in1", "r-out1", "r-in2", "r-out2",
                                                                       "r-out-s", "r-out-t"))
    admin = free_port()
    d = routes_daemon(tmp_path / "routes.toml", bootstrap, tmp_path, top=f'admin_address = "127.0.0.1:{admin}"\n',
                      a=f'model = "{v1}"\ninput_topic = "{in1}"\noutput_topic = "{out1}"\n',
                      b=f'model = "{mavg}"\ninput_topic = "{in2}"\noutput_topic = "{out2}"\n',
                      s=f'model = "{v2}"\ninput_topic = "{in1}"\noutput_topic = "{out_s}"\nshadow = true\n',
                      t=f'model = "{tmp_path / "missing.onnx"}"\ninput_topic = "{in1}"\noutput_topic = "{out_t}"\n'
                        'shadow = true\n')
    rng = np.random.default_rng(4)
    xs1 = {f"k{i}".encode(): rng.uniform(-1, 1, 12).tolist() for i in range(20)}
    xs2 = {f"m{i}".encode(): rng.uniform(-1, 1, 12).tolist() for i in range(10)}
    with d:
        d.start()
        produce(bootstrap, in1, [(k, {"x": [x[i]]}) for i in range(12) for k, x in xs1.items()])
        produce(bootstrap, in2, [(k, {"x": [x[i]]}) for i in range(12) for k, x in xs2.items()])
        got = {topic: consume(bootstrap, topic, n, timeout=60, settle=0.5)
               for topic, n in ((out1, 240), (out2, 120), (out_s, 240))}
        deadline = time.monotonic() + 10
        while d.metric("rnnd_predictions_total", route="a") < 240 and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = d.metrics()
        assert d.http("/readyz")[0] == 200 and d.http("/healthz")[0] == 200
        req = urllib.request.Request(f"http://127.0.0.1:{admin}/admin/reload/s", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["routes"] == [{"route": "s", "status": 200, "result": "unchanged", "serving": "product@2",
                                     "message": answer["routes"][0]["message"]}]
        d.send_signal(signal.SIGTERM)
        assert d.wait(60) == 0
    log = d.log()
    assert "shadow route t NOT STARTED, the other routes go on" in log and "Traceback" not in log
    assert "route a rnnd.daemon: serving product@1" in log and "route s rnnd.daemon: serving product@2" in log
    assert consume(bootstrap, out_t, 1, timeout=2) == []
    for name, topic, model, xs in (("a", out1, BundleModel(v1), xs1), ("b", out2, BundleModel(mavg), xs2),
                                   ("s", out_s, BundleModel(v2), xs1)):
        outputs = got[topic]
        assert len(outputs) == 12 * len(xs) and {o.value["model"] for o in outputs} == {model.spec.model.ref}
        values = model.spec.output.names[0]
        for key, seq in xs.items():
            mine = sorted((o.value for o in outputs if o.key == key), key=lambda v: v["step"])
            assert [v["step"] for v in mine] == list(range(12)), (name, key)
            err = np.max(np.abs(np.array([v["prediction"]["values"][values] for v in mine]) - reference(model, seq)))
            assert err <= 1e-4, (name, key, err)
        assert metrics[("rnnd_predictions_total", (("route", name),))] == len(outputs)
    assert metrics[("rnnd_route_up", (("route", "t"), ("shadow", "true")))] == 0
    assert metrics[("rnnd_route_up", (("route", "a"), ("shadow", "false")))] == 1
    assert ("process_resident_memory_bytes", ()) in metrics  # the process's own, once, unlabelled
    lag = [labels for name, labels in metrics if name == "rnnd_event_loop_lag_max_seconds"]
    assert lag == [()]  # one loop serves every route: measured once, not per route
    assert not [labels for name, labels in metrics if name == "rnnd_predictions_total" and not labels]


def test_the_readme_routes_file_loads_as_it_says(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```toml\n# routes.toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "routes.toml"
    path.write_text(block)
    routes = config.load_routes(env={}, config_file=path)
    assert list(routes) == ["sensors", "reviews", "sensors-candidate"]
    candidate = routes["sensors-candidate"]
    assert candidate.shadow and candidate.dlq_topic == "sensors.sensors-candidate.dlq"
    assert routes["reviews"].max_batch == 256 and routes["sensors"].group_id == "rnnd-sensors"


def test_a_shadow_that_stops_leaves_the_others_serving_and_a_served_route_that_stops_stops_all(
        bootstrap, topic_factory, upgrade_bundles, tmp_path) -> None:
    """A route whose changelog holds state of another layout stops (exit 2, as one daemon would). As a
    shadow it stops alone and the served route goes on; as a served route it stops the process."""
    import base64

    import orjson

    from rnnd.daemon.local import Session

    v1, _, v3 = upgrade_bundles
    in1, out1, out_s = (topic_factory(n, 1) for n in ("f-in1", "f-out1", "f-out-s"))
    session = Session(v3)
    session.predict([("k", {"x": [0.5]})])
    _, key, record = orjson.loads(session.checkpoint())["streams"][0]
    foreign = (base64.b64decode(key), base64.b64decode(record))  # a stream's state of v3's layout

    def run(shadow: bool) -> tuple[int, str, int]:
        suffix = "shadow" if shadow else "served"
        changelog = topic_factory(f"f-state-{suffix}", 1)
        produce(bootstrap, changelog, [foreign])
        d = routes_daemon(tmp_path / f"routes-{suffix}.toml", bootstrap, tmp_path,
                          a=f'model = "{v1}"\ninput_topic = "{in1}"\noutput_topic = "{out1}"\n'
                            f'group_id = "g-a-{suffix}"\n',
                          s=f'model = "{v1}"\ninput_topic = "{in1}"\noutput_topic = "{out_s}"\n'
                            f'changelog_topic = "{changelog}"\ndead_letter_topic = "{changelog}.dlq"\n'
                            f'shadow = {str(shadow).lower()}\n')
        with d:
            d.start(wait_ready=False)
            deadline = time.monotonic() + 60
            while "STOPPED" not in d.log() and "stopped unasked" not in d.log() and d.proc.poll() is None:
                assert time.monotonic() < deadline, d.log()[-3000:]
                time.sleep(0.1)
            served = 0
            if shadow:  # the served route goes on
                d.wait_ready()
                produce(bootstrap, in1, [(b"k", {"x": [0.25]})])
                served = len(consume(bootstrap, out1, 1, timeout=30))
                assert d.metric("rnnd_route_up", route="s", shadow="true") == 0
                d.send_signal(signal.SIGTERM)
            return d.wait(60), d.log(), served

    code, log, served = run(shadow=True)
    assert code == 0 and served >= 1, log[-3000:]
    assert "shadow route s STOPPED (exit 2); the other routes go on" in log
    code, log, _ = run(shadow=False)
    assert code == 2, log[-3000:]
    assert "route s stopped unasked (exit 2): stopping every route" in log
