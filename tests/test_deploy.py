"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/k8s, Prometheus, Grafana) against the code.

There is no Docker engine or cluster here, so these tests check what can be checked without
one, against the real thing wherever possible:

* every RNND_* variable and config key the files set is a setting of ``rnnd serve``, and the
  settings each file gives a replica load and validate (types, choices, TLS/SASL rules);
* every metric a Grafana panel or an alert rule queries is exported by a running daemon
  (a real process, a real bundle, real traffic, scraped over HTTP);
* topic names and partition counts agree across compose, the ConfigMap and the KEDA trigger;
* the Dockerfile's serving stages install no torch and no compilers, run as a non-root user,
  have a health check and pinned base images; and the runtime image's contents — the same
  requirement set installed into a plain venv — serve a real model against the test broker.
"""

from __future__ import annotations

import base64
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import DaemonProcess, consume, free_port, produce
from kafka_fixtures import run_async
from prometheus_client.parser import text_string_to_metric_families
from tls_certs import make_ca

from rnnd.daemon import config, security
from rnnd.daemon.config import ServeConfig
from rnnd.daemon.kafka.transactions import TRANSACTION_TIMEOUT_MS
from rnnd.embedded_broker import create_topics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS = {s.name for s in config.settings_of()}

#: Metrics the dashboard and alerts use that come with durable state (the changelog topic).
#: While the daemon does not export them yet, their checks are skipped (and say so); once it
#: does, they are checked like every other metric.
EXPECTED_FROM_CHANGELOG = {"rnnd_restore_seconds", "rnnd_restore_records"}
#: Series that Prometheus itself makes for every scrape target; no exporter exports them.
PROMETHEUS_BUILTIN = {"up"}
#: Counters with labels whose series appear only when something goes wrong: a healthy test
#: daemon declares them (checked) but has no sample of them (not required).
ONLY_ON_TROUBLE = {"rnnd_kafka_errors_total"}


# --- reading the files --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def daemon_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run `rnnd serve`: the runtime image with its own entrypoint."""
    return {name: s for name, s in doc["services"].items()
            if s.get("image") == "rnnd:local" and "entrypoint" not in s and "command" not in s}


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under deploy/k8s, by file name."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for docs in k8s_docs().values() for d in docs
             if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def configmap_toml() -> dict[str, Any]:
    return tomllib.loads(k8s_object("ConfigMap", "rnnd-config")["data"]["rnnd.toml"])


def rnnd_container() -> dict[str, Any]:
    containers = k8s_object("Deployment", "rnnd")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "rnnd")


@dataclass
class Topic:
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def compose_topics(doc: dict[str, Any]) -> dict[str, Topic]:
    """The topics the `topics` job creates: name -> partitions and configs (parsed from its commands)."""
    script = "\n".join(doc["services"]["topics"]["command"])
    topics: dict[str, Topic] = {}
    for line in script.splitlines():
        if "--create" not in line:
            continue
        args = shlex.split(line)
        name = args[args.index("--topic") + 1]
        configs = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--config")
        topics[name] = Topic(int(args[args.index("--partitions") + 1]), configs)
    return topics


def load_settings(env: dict[str, str], config_file: Path | None = None) -> ServeConfig:
    """What a replica would run with: the image's ENV defaults under the given environment."""
    image_env = {k: v for k, v in dockerfile_stages()[-1].env.items() if k.startswith("RNND_")}
    return config.load(argv_values={}, env={**image_env, **env}, config_file=config_file)


def changelog_topic(cfg: ServeConfig) -> str:
    group = cfg.group_id or "rnnd-<model>"
    return cfg.changelog_topic or f"{group}.{cfg.input_topic}.changelog"


# --- compose ---------------------------------------------------------------------------------------------


def test_compose_rnnd_variables_are_settings_with_valid_values() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        unknown = [k for k in env_of(service) if k.startswith("RNND_") and k != "RNND_CONFIG"
                   and k.removeprefix("RNND_").lower() not in SETTINGS]
        assert not unknown, f"service {name}: {unknown} are not settings of rnnd serve (docs/configuration.md)"
    replicas = daemon_services(doc)
    assert len(replicas) >= 2, "the stack runs two replicas in one group"
    cfgs = {name: load_settings(env_of(s)) for name, s in replicas.items()}  # types, choices, security rules
    assert len({c.group_id for c in cfgs.values()}) == 1 and next(iter(cfgs.values())).group_id
    assert len({c.input_topic for c in cfgs.values()}) == 1
    assert len({c.client_id for c in cfgs.values()}) == len(cfgs), "replicas should tell themselves apart"
    # the producer runs `rnnd produce`, which reads only the security variables
    producer = env_of(doc["services"]["producer"])
    tool_settings = {f.name for f in fields(security.KafkaSecurity)}
    assert all(k.removeprefix("RNND_").lower() in tool_settings for k in producer if k.startswith("RNND_"))
    import argparse

    security.from_args(argparse.Namespace(), env=producer)


def test_compose_topics_job_creates_every_topic_the_replicas_use() -> None:
    doc = compose()
    topics = compose_topics(doc)
    for name, service in daemon_services(doc).items():
        cfg = load_settings(env_of(service))
        used = {"input": cfg.input_topic, "output": cfg.output_topic, "dead letters": cfg.dlq_topic,
                "changelog": changelog_topic(cfg)}
        for role, topic in used.items():
            assert topic in topics, f"{name}: the {role} topic {topic!r} is not created by the topics job"
        parts = topics[cfg.input_topic].partitions
        for role, topic in used.items():
            assert topics[topic].partitions == parts, f"{role} topic {topic} must have the input's {parts} partitions"
        assert topics[changelog_topic(cfg)].configs == {"cleanup.policy": "compact"}
        assert cfg.create_topics is False  # the job made them all: a typo must fail, not create a topic
    kafka_env = env_of(doc["services"]["kafka"])
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # the Kafka the test suite runs (rnnd.apache_kafka.VERSION), in both the broker and the topics job
    for service in ("kafka", "topics"):
        assert doc["services"][service]["image"].startswith("apache/kafka:4.4."), service
    assert "broker,controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, one node
    assert len(base64.urlsafe_b64decode(kafka_env["CLUSTER_ID"] + "==")) == 16, "a KRaft cluster id is 16 bytes"


def test_compose_stack_can_run_exactly_once() -> None:
    """The documented switch to exactly_once works on this stack as it is: the settings load, the broker has room."""
    doc = compose()
    text = (DEPLOY / "compose.yaml").read_text()
    assert "# RNND_PROCESSING_GUARANTEE: exactly_once" in text, "the stack documents the exactly_once switch"
    for name, service in daemon_services(doc).items():
        cfg = load_settings({**env_of(service), "RNND_PROCESSING_GUARANTEE": "exactly_once"})
        assert cfg.exactly_once and cfg.changelog, name
    kafka_env = env_of(doc["services"]["kafka"])
    # one node: the transaction state log's defaults (3 replicas, min ISR 2) would fail every transaction
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert int(kafka_env.get("KAFKA_TRANSACTION_MAX_TIMEOUT_MS", "900000")) >= TRANSACTION_TIMEOUT_MS


def test_compose_demo_jobs_fit_together() -> None:
    """The model the replicas load is the one the model job trains; the producer replays the CSV the data job writes."""
    doc = compose()
    s = doc["services"]
    train = s["model"]["command"]
    recipe, out = train[train.index("train") + 1], train[train.index("--out") + 1]
    for name, service in daemon_services(doc).items():
        assert load_settings(env_of(service)).model == f"{out}/{recipe}.onnx", name
        assert "models:/models:ro" in service["volumes"]
    assert "models:/models" in s["model"]["volumes"]
    assert s["model"]["build"]["target"] == "export" and s["model"]["build"]["context"] == ".."
    data = s["demo-data"]["command"]
    csv_path = data[data.index("--out") + 1]
    loop = s["producer"]["command"][0]
    assert f"rnnd produce {csv_path} --topic {load_settings(env_of(s['rnnd-1'])).input_topic} " in loop
    script = s["demo-data"]["entrypoint"][-1]
    mount = next(v for v in s["demo-data"]["volumes"] if v.endswith(":ro") and v.split(":")[1] in script)
    assert (DEPLOY / mount.split(":")[0] / Path(script).name).is_file()
    for job in ("topics", "model"):
        assert s["rnnd-1"]["depends_on"][job]["condition"] == "service_completed_successfully"


def test_demo_data_is_what_the_sensors_model_and_rnnd_produce_expect(tmp_path: Path) -> None:
    import runpy

    from rnnd.synthetic import SENSORS
    from rnnd.tools import MessageSource

    script = runpy.run_path(str(DEPLOY / "demo" / "sensors_csv.py"))
    out = tmp_path / "demo.csv"
    assert script["main"](["--out", str(out), "--devices", "3", "--steps", "4"]) == 0
    with MessageSource(out, "device") as source:
        messages = [(m.key.decode(), json.loads(m.value)) for m in source]
    assert len(messages) == 12
    assert [k for k, _ in messages[:3]] == ["dev-0", "dev-1", "dev-2"]  # interleaved, step by step
    assert all(tuple(doc["x"]) == SENSORS for _, doc in messages)  # the recipe's features, in order
    assert [doc.get("control") for _, doc in messages] == ["reset"] * 3 + [None] * 9


def test_prometheus_scrapes_every_replica_and_loads_the_alerts() -> None:
    doc = compose()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "rnnd")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{name}:{load_settings(env_of(s)).http_port}" for name, s in daemon_services(doc).items()}
    assert targets == expected
    mounts = dict(v.split(":")[1::-1] for v in doc["services"]["prometheus"]["volumes"])  # container -> host
    for rule_file in prom["rule_files"]:
        assert (DEPLOY / mounts[rule_file]).is_file()
    assert (DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).name == "prometheus.yml"


# --- Kubernetes ----------------------------------------------------------------------------------------------


def test_k8s_config_keys_and_variables_are_settings() -> None:
    cm = configmap_toml()
    assert set(cm) <= SETTINGS, f"unknown settings in the ConfigMap: {sorted(set(cm) - SETTINGS)}"
    env = {e["name"]: e for e in rnnd_container()["env"]}
    unknown = [n for n in env if n.startswith("RNND_") and n != "RNND_CONFIG"
               and n.removeprefix("RNND_").lower() not in SETTINGS]
    assert not unknown, unknown
    for name, entry in env.items():  # a variable and the config file must not both set a setting
        assert name.removeprefix("RNND_").lower() not in cm, f"{name} is also set in the ConfigMap"
        assert "value" in entry or "valueFrom" in entry


def test_k8s_configmap_loads_with_the_secret_files_mounted(tmp_path: Path) -> None:
    """The ConfigMap's settings validate once the Secret's files are where the Deployment mounts them.

    The files are made here (a real CA certificate and a password) under tmp_path, at the
    mount paths the Deployment declares, and the config is loaded as the pod would load it.
    """
    container = rnnd_container()
    pod = k8s_object("Deployment", "rnnd")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    secret = k8s_object("Secret", "rnnd-kafka")  # secret.example.yaml: the keys users must provide
    keys = set(secret["stringData"])
    # RNND_CONFIG is the ConfigMap's key at its mount path
    conf_path = Path(env["RNND_CONFIG"]["value"])
    assert mounts[str(conf_path.parent)]["configMap"]["name"] == "rnnd-config"
    assert conf_path.name in k8s_object("ConfigMap", "rnnd-config")["data"]
    # every file setting points into a mounted Secret volume that provides that file
    cm = configmap_toml()
    text = k8s_object("ConfigMap", "rnnd-config")["data"]["rnnd.toml"]
    ca = make_ca(tmp_path / "pki")
    for setting in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_file", "sasl_password_file"):
        if not cm.get(setting):
            continue
        path = Path(cm[setting])
        volume = mounts[str(path.parent)]
        assert volume["secret"]["secretName"] == "rnnd-kafka"
        item = next(i for i in volume["secret"]["items"] if i["path"] == path.name)
        assert item["key"] in keys
        local = tmp_path / path.relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(ca.cert.read_bytes() if setting == "ssl_cafile" else b"s3cret\n")
        text = text.replace(f'"{path}"', f'"{local}"')
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "rnnd-kafka" and ref["key"] in keys
    local_conf = tmp_path / "rnnd.toml"
    local_conf.write_text(text)
    pod_env = {"RNND_SASL_USERNAME": "rnnd", "RNND_CLIENT_ID": "rnnd-5d9f-abcde", "RNND_INTRA_OP_THREADS": "2"}
    assert set(pod_env) == {n for n in env if n != "RNND_CONFIG"}
    cfg = load_settings(pod_env, config_file=local_conf)
    kw = security.client_kwargs(security.KafkaSecurity.from_settings(cfg))
    assert kw["security_protocol"] == cfg.security_protocol and kw["sasl_plain_password"] == "s3cret"


def test_k8s_deployment_probes_resources_and_user() -> None:
    container = rnnd_container()
    pod = k8s_object("Deployment", "rnnd")["spec"]["template"]["spec"]
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == configmap_toml()["http_port"]
    assert configmap_toml()["http_host"] == "0.0.0.0"  # probes and scrapes come from outside the pod
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_stages()[-1].user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # the pod monitor and the service find the pods and their metrics port
    labels = k8s_object("Deployment", "rnnd")["spec"]["template"]["metadata"]["labels"]
    monitor = k8s_object("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    service = k8s_object("Service", "rnnd-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kust["resources"]) == manifests
    image = rnnd_container()["image"]
    assert any(i["name"] == image for i in kust["images"])


def test_topics_and_partitions_agree_across_compose_configmap_and_keda() -> None:
    doc = compose()
    topics = compose_topics(doc)
    demo = load_settings(env_of(next(iter(daemon_services(doc).values()))))
    cm = configmap_toml()
    for setting in ("input_topic", "output_topic", "dead_letter_topic", "group_id", "changelog_topic"):
        assert cm[setting] == getattr(demo, setting), f"{setting}: ConfigMap {cm[setting]!r}, compose " \
                                                      f"{getattr(demo, setting)!r}"
    scaled = k8s_object("ScaledObject", "rnnd")
    trigger = next(t for t in scaled["spec"]["triggers"] if t["type"] == "kafka")
    meta = trigger["metadata"]
    assert meta["topic"] == cm["input_topic"]
    assert meta["consumerGroup"] == cm["group_id"]
    assert meta["bootstrapServers"] == cm["bootstrap_servers"]
    # replicas beyond the partition count idle: the autoscaler stops at the partition count
    assert scaled["spec"]["maxReplicaCount"] == topics[cm["input_topic"]].partitions
    assert meta["allowIdleConsumers"] == "false"
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s_object("Deployment")["metadata"]["name"]
    # KEDA connects the way the daemon does
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    protocol = cm.get("security_protocol", "PLAINTEXT")
    assert meta.get("sasl", "none") == (keda_sasl[cm["sasl_mechanism"]] if "SASL" in protocol else "none")
    assert meta.get("tls", "disable") == ("enable" if protocol in ("SSL", "SASL_SSL") else "disable")
    auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    keys = set(k8s_object("Secret", "rnnd-kafka")["stringData"])
    assert all(ref["name"] == "rnnd-kafka" and ref["key"] in keys for ref in auth["spec"]["secretTargetRef"])


# --- metrics: dashboard and alerts against a running daemon -------------------------------------------------


_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                 "offset", "atan2", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (not functions, labels, keywords or Grafana variables)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def family_of(name: str) -> str:
    """A sample name's metric family: the name less the one suffix its type adds."""
    for suffix in ("_bucket", "_sum", "_count", "_total", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count",
                    "_created"), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
                    "unknown": ("",)}


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (le) (rate(rnnd_end_to_end_latency_seconds_bucket[5m]))) > 1',
     {"rnnd_end_to_end_latency_seconds_bucket"}),
    ('up{job="rnnd"} == 0', {"up"}),
    ("sum(rnnd_consumer_lag) > 10000 and deriv(sum(rnnd_consumer_lag)[10m:1m]) > 0", {"rnnd_consumer_lag"}),
    ('rnnd_model_info{fallback="true", provider=~"cuda.*"} == 1', {"rnnd_model_info"}),
    ("sum by (reason) (rate(rnnd_dead_letters_total[$__rate_interval]))", {"rnnd_dead_letters_total"}),
    ("rate(a_sum[5m] offset 1h) / on(instance) group_left(version) rate(b_count[5m])", {"a_sum", "b_count"}),
    ("max_over_time(rnnd_fetch_paused[10m]) == 1 and min_over_time(rnnd_fetch_paused[10m]) == bool 1",
     {"rnnd_fetch_paused"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metrics(expr) == names


@pytest.mark.parametrize(("name", "family"), [
    ("rnnd_end_to_end_latency_seconds_bucket", "rnnd_end_to_end_latency_seconds"),
    ("rnnd_messages_consumed_total", "rnnd_messages_consumed"), ("rnnd_batch_size_sum", "rnnd_batch_size"),
    ("rnnd_restore_seconds_count", "rnnd_restore_seconds"), ("rnnd_consumer_lag", "rnnd_consumer_lag"),
    ("rnnd_restore_records_total", "rnnd_restore_records"),
])
def test_family_of(name: str, family: str) -> None:
    assert family_of(name) == family


def dashboard_queries() -> dict[str, str]:
    """Panel title (and target) -> PromQL, from the provisioned dashboard."""
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "rnnd.json").read_text())
    return {f"panel {p['title']!r} {t['refId']}": t["expr"] for p in dash["panels"] for t in p["targets"]}


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {f"alert {r['alert']}": r["expr"] for g in rules["groups"] for r in g["rules"]}


@dataclass
class Scrape:
    families: dict[str, str]  # family -> type, as the daemon declares them
    samples: set[str]  # sample names with at least one sample

    def valid_names(self) -> set[str]:
        return {f + s for f, typ in self.families.items() for s in _SAMPLE_SUFFIXES.get(typ, ("",))}


@pytest.fixture(scope="module")
def scrape(recipe_bundle: Callable[[str], Path], bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    """/metrics of a real daemon after real traffic: predictions, a dead letter, lag, (restores)."""
    tag = uuid.uuid4().hex[:8]
    inp, out = f"deploy-in-{tag}", f"deploy-out-{tag}"
    run_async(create_topics(bootstrap, {inp: 2, out: 2}))
    with DaemonProcess(recipe_bundle("product"), bootstrap, inp, out, group=f"rnnd-deploy-{tag}",
                       log_dir=tmp_path_factory.mktemp("deploy-daemon")) as d:
        d.start()
        produce(bootstrap, inp, [(f"k{i % 4}".encode(), {"x": [0.1 * i]}) for i in range(20)]
                + [(b"broken", b"not json")])
        assert len(consume(bootstrap, out, expect=20, timeout=60)) >= 20
        deadline = time.monotonic() + 30
        while True:
            status, text = d.http("/metrics")
            assert status == 200
            samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
            if {"rnnd_dead_letters_total", "rnnd_consumer_lag", "rnnd_end_to_end_latency_seconds_bucket"} <= samples \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert d.stop() == 0
    families = {fam.name: fam.type for fam in text_string_to_metric_families(text)}
    return Scrape(families, samples)


def _check(queries: dict[str, str], scrape: Scrape, *, changelog: bool) -> list[str]:
    valid, problems = scrape.valid_names(), []
    for where, expr in queries.items():
        for name in promql_metrics(expr):
            if name in PROMETHEUS_BUILTIN or (family_of(name) in EXPECTED_FROM_CHANGELOG) != changelog:
                continue
            if name not in valid:
                problems.append(f"{where}: {name} is not exported by the daemon ({expr})")
            elif name not in scrape.samples and name not in ONLY_ON_TROUBLE:
                problems.append(f"{where}: {name} is declared but had no sample after real traffic")
    return problems


def test_dashboard_and_alerts_query_only_metrics_the_daemon_exports(scrape: Scrape) -> None:
    queries = {**dashboard_queries(), **alert_queries()}
    assert len(queries) >= 10
    assert not _check(queries, scrape, changelog=False)
    # nothing outside rnnd's own metrics (and Prometheus' `up`) is queried
    names = {n for e in queries.values() for n in promql_metrics(e)}
    assert all(n.startswith("rnnd_") or n in PROMETHEUS_BUILTIN for n in names), names


@pytest.mark.parametrize("family", sorted(EXPECTED_FROM_CHANGELOG))
def test_dashboard_changelog_metrics_are_exported(scrape: Scrape, family: str) -> None:
    queries = {**dashboard_queries(), **alert_queries()}
    assert any(family_of(n) == family for e in queries.values() for n in promql_metrics(e)), \
        f"no panel or alert uses {family}"
    assert family in scrape.families, f"the daemon does not export {family}"
    problems = _check({w: e for w, e in queries.items() if any(family_of(n) == family for n in promql_metrics(e))},
                      scrape, changelog=True)
    assert not problems


def test_dashboard_has_the_panels_operators_need() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "rnnd.json").read_text())
    exprs = " ".join(dashboard_queries().values())
    for needed in ("rate(rnnd_predictions_total", "rate(rnnd_messages_consumed_total",
                   "rate(rnnd_end_to_end_latency_seconds_bucket", "rnnd_batch_size_", "rnnd_active_streams",
                   "sum by (reason) (rate(rnnd_dead_letters_total", "rnnd_consumer_lag", "rnnd_restore_seconds_"):
        assert needed in exprs, needed
    assert "histogram_quantile(0.99, sum by (le) (rate(rnnd_end_to_end_latency_seconds_bucket" in exprs
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "rnnd.yml").read_text())
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[1::-1] for v in grafana["volumes"])
    assert (DEPLOY / mounts[provider["providers"][0]["options"]["path"]] / "rnnd.json").is_file()


# --- Dockerfile -------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str  # resolved: an image reference, or another stage's name
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments) with continuations joined

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    @property
    def user(self) -> str:
        users = self.args("USER")
        return users[-1] if users else ""

    @property
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for a in self.args("ENV"):
            for k, v in (t.split("=", 1) for t in shlex.split(a)):
                out[k] = v
        return out

    @property
    def copied_from(self) -> set[str]:
        return {m.group(1) for a in self.args("COPY") for m in [re.search(r"--from=(\S+)", a)] if m}


def dockerfile_stages() -> list[Stage]:
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            key, _, value = rest.partition("=")
            global_args[key] = value
        elif instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: global_args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(m.group(2) or str(len(stages)), base, []))
        else:
            stages[-1].instructions.append((instruction, rest))
    return stages


def closure(stages: list[Stage], name: str) -> list[Stage]:
    """A stage and every stage it is built on or copies from."""
    by_name = {s.name: s for s in stages}
    todo, seen = [name], []
    while todo:
        s = by_name[todo.pop()]
        if s not in seen:
            seen.append(s)
            todo += [n for n in ({s.base} | s.copied_from) if n in by_name]
    return seen


COMPILERS = {"gcc", "g++", "cc", "c++", "clang", "build-essential", "make", "cmake", "rustc", "cargo",
             "python3-dev", "python3.11-dev", "libc6-dev"}


def pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` in the stage's RUN commands."""
    out = []
    for run in stage.args("RUN"):
        for m in re.finditer(r"pip install ([^;&|]*)", run):
            out.append(shlex.split(m.group(1)))
    return out


def test_base_images_are_pinned_to_a_version_tag() -> None:
    stages = dockerfile_stages()
    names = {s.name for s in stages}
    images = {s.base for s in stages if s.base not in names}
    assert images
    for image in images:
        assert "$" not in image, f"unresolved base image {image}"
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: pin a version tag, not {tag!r}"


@pytest.mark.parametrize("target", ["runtime", "gpu"])
def test_serving_images_hold_no_torch_no_compilers_and_run_as_a_user(target: str) -> None:
    stages = dockerfile_stages()
    if target == "runtime":
        assert stages[-1].name == "runtime", "the default target (the last stage) must be the CPU runtime"
    stage = next(s for s in stages if s.name == target)
    for s in closure(stages, target):
        for run in s.args("RUN"):
            words = set(re.split(r"[\s;&|]+", run))
            assert not words & COMPILERS, f"stage {s.name} installs a compiler: {words & COMPILERS}"
        for args in pip_installs(s):
            assert not any("torch" in a or "[export" in a for a in args), f"stage {s.name}: pip install {args}"
            requirement_files = [args[i + 1] for i, a in enumerate(args) if a == "-r"]
            assert all(f in ("requirements/runtime.txt", "/tmp/runtime-gpu.txt") for f in requirement_files)
    installs = [a for s in closure(stages, target) for a in pip_installs(s)]
    assert ["--no-deps", "."] in installs, "rnnd itself goes on top of the requirement set, with --no-deps"
    # non-root, numeric (Kubernetes' runAsNonRoot can only verify a numeric user)
    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", stage.user), stage.user
    assert stage.args("ENTRYPOINT") == ['["rnnd", "serve"]']
    (health,) = stage.args("HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health
    assert stage.env["RNND_MODEL"] == "/models/model.onnx"
    assert set(k for k in stage.env if k.startswith("RNND_")) <= {f"RNND_{s.upper()}" for s in SETTINGS}
    if target == "gpu":
        assert "onnxruntime-gpu" in " ".join(r for s in closure(stages, target) for r in s.args("RUN"))
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+",
                            next(s for s in closure(stages, target) if s.base.startswith("nvidia/")).base)


def test_export_target_has_torch_and_the_model_can_be_baked_in() -> None:
    stages = {s.name: s for s in dockerfile_stages()}
    installs = pip_installs(stages["export"])
    assert any(".[export]" in args and "requirements/dev.txt" in args for args in installs)
    assert stages["export"].args("ENTRYPOINT") == ['["rnnd"]']
    model = stages["model"]
    assert "MODEL=" in model.args("ARG") and any("/models/model.onnx" in r for r in model.args("RUN"))
    assert "model" in stages["runtime"].copied_from and "model" in stages["gpu"].copied_from


def test_dockerignore_keeps_everything_the_images_copy() -> None:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    sources = {src for s in dockerfile_stages() for a in s.args("COPY") if "--from" not in a
               for src in shlex.split(a)[:-1] if not src.startswith("--")}
    assert {"requirements/runtime.txt", "requirements/dev.txt", "pyproject.toml", "README.md", "LICENSE", "cli",
            "daemon", "export"} <= sources
    for src in sources:
        assert not any(fnmatch.fnmatch(src, p.rstrip("/")) for p in patterns), f"{src} is excluded by .dockerignore"
    assert ".venv" in patterns and ".git" in patterns


def test_runtime_requirements_pin_what_the_tests_run() -> None:
    pins = {}
    for line in (REPO / "requirements" / "runtime.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line}: pin an exact version"
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    assert "torch" not in pins
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for dep in pyproject["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", dep)[0].lower())
        assert name in pins, f"{name} (a dependency of rnnd) is missing from requirements/runtime.txt"
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"{name}: the venv runs {importlib.metadata.version(name)}"


# --- the runtime image's contents, as a plain venv --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv built the way the Dockerfile builds the runtime image: the requirement set, then rnnd --no-deps.

    The source is copied from exactly what the build stage COPYs, so a file the image lacks is
    missing here too.
    """
    root = tmp_path_factory.mktemp("runtime-image")
    src, venv = root / "src", root / "venv"
    build = next(s for s in dockerfile_stages() if s.name == "build")
    for a in build.args("COPY"):
        *sources, dest = shlex.split(a)
        for source in sources:
            target = src / (source if dest in ("./", ".") else dest)
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for step in ([*pip, "-r", "requirements/runtime.txt"],
                 [*pip, "--no-deps", "."]):
        done = subprocess.run(step, cwd=src, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(step)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    yield venv


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would lead Python to the development venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def test_runtime_venv_has_no_torch_and_serves(runtime_venv: Path, recipe_bundle: Callable[[str], Path],
                                              bootstrap: str, topic_factory: Callable[..., str],
                                              tmp_path: Path) -> None:
    python, rnnd = runtime_venv / "bin" / "python", runtime_venv / "bin" / "rnnd"
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=clean_env())
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    assert "torch" not in freeze.lower()
    helped = subprocess.run([rnnd, "serve", "--help"], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert helped.returncode == 0 and "--security-protocol" in helped.stdout and "--sasl-password-file" in helped.stdout

    inp, out = topic_factory("venv-in", partitions=2), topic_factory("venv-out", partitions=2)
    d = DaemonProcess(recipe_bundle("product"), bootstrap, inp, out, group=f"rnnd-venv-{uuid.uuid4().hex[:6]}",
                      log_dir=tmp_path)
    assert d.args[:4] == [sys.executable, "-m", "rnnd", "serve"]
    d.args[:3] = [str(rnnd)]  # the image's entrypoint: the venv's own `rnnd serve`
    d.env = clean_env()
    with d:
        d.start()
        assert "torch" not in d.log().lower()
        produce(bootstrap, inp, [(f"s{i % 2}".encode(), {"x": [0.2 * i]}) for i in range(5)])
        predictions = consume(bootstrap, out, expect=5, timeout=60)
        assert sorted((p.key, p.value["step"]) for p in predictions) == [(b"s0", 0), (b"s0", 1), (b"s0", 2),
                                                                         (b"s1", 0), (b"s1", 1)]
        # the image's HEALTHCHECK command, run by the venv's python against this daemon
        health = healthcheck_command()
        assert subprocess.run([str(python), *health[1:]], env=clean_env(RNND_HTTP_PORT=str(d.port)),
                              timeout=30).returncode == 0
        assert subprocess.run([str(python), *health[1:]], env=clean_env(RNND_HTTP_PORT=str(free_port())),
                              capture_output=True, timeout=30).returncode != 0
        assert d.stop() == 0, d.log()[-3000:]


def healthcheck_command() -> list[str]:
    """The runtime stage's HEALTHCHECK CMD (exec form) as an argv."""
    (health,) = dockerfile_stages()[-1].args("HEALTHCHECK")
    argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    return argv


def test_readme_deploy_section_matches_the_files() -> None:
    """The commands README "Deploy" gives name targets, files and folders that exist."""
    readme = (REPO / "README.md").read_text()
    assert "\n## Deploy\n" in readme
    deploy = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    for heading in ("### Images", "### Compose", "### Kubernetes", "### Scaling", "### Security"):
        assert heading in deploy, heading
    stages = {s.name for s in dockerfile_stages()}
    targets = set(re.findall(r"docker build --target (\S+)", deploy))
    assert targets == {"gpu", "export"} and targets <= stages
    assert "docker build -t rnnd ." in deploy  # the default target: the CPU runtime
    assert "docker compose -f deploy/compose.yaml up" in deploy
    assert "kubectl apply -k deploy/k8s" in deploy and (K8S / "kustomization.yaml").is_file()
    assert "replicas beyond the partition count get no partition and idle" in deploy
    for setting in re.findall(r"`((?:ssl|sasl|security|http)_[a-z_]+)`", deploy):
        assert setting in SETTINGS, f"README names {setting}, which is not a setting"
    cuda = next(s.base for s in dockerfile_stages() if s.base.startswith("nvidia/cuda:"))
    assert cuda in deploy, "README names the GPU base image the Dockerfile uses"


@pytest.mark.parametrize(("argv", "extra"), [
    (["train", "sensors", "--out", "models"], "export"),
    (["export", "m.py:build", "--checkpoint", "m.pt", "--out", "m.onnx"], "export"),
    (["demo", "--duration", "1"], "demo"),  # the shipped bundle needs no torch; the broker is the demo extra
    (["demo", "--train", "--duration", "1"], "export"),
])
def test_a_serving_install_names_the_extra_a_command_needs(runtime_venv: Path, tmp_path: Path, argv: list[str],
                                                         extra: str) -> None:
    """No torch in the image: torch-needing commands say what to install, in one line, not a traceback."""
    done = subprocess.run([str(runtime_venv / "bin" / "rnnd"), *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=clean_env(), timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'rnnd[{extra}]'" in lines[0], done.stderr
