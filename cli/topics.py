"""`rnnd topics create`: the four topics `rnnd serve` uses, made ahead of time, on any broker.

The daemon refuses to start without its input topic (the partition count is a decision: it
bounds how many replicas can share the work), and creates the others with the input's count.
Making all of them here, from the same settings as ``rnnd serve`` (``--config rnnd.toml``,
``RNND_*`` variables, the same flags), means the names are derived by the daemon's own rules
(``ServeConfig.dlq_topic``, ``names.group_and_topic``), the changelog is compacted and
co-partitioned with the input, and a topic that exists with another layout is found before
any data flows, not by a daemon that will not start.

Running it again is harmless: topics that exist with the right partition count are reported
as existing. Only metadata of *all* topics is ever requested, never of a named one: Tansu (and
Kafka with auto-creation on) creates a topic that a metadata request names, with a default
partition count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, fields
from typing import Any

from rnnd.daemon import changelog, names, security
from rnnd.daemon import config as serve_config
from rnnd.daemon.config import ConfigError, ServeConfig
from rnnd.tools import ToolError, positive_int

__all__ = ["DEFAULT_PARTITIONS", "PlannedTopic", "add_parser", "create", "plan_names"]

#: Partitions of a new input topic when --partitions is not given and the input does not exist.
DEFAULT_PARTITIONS = 4

#: The serve settings that decide the topics' names and how to reach the broker (security
#: flags come from ``security.add_arguments``, as for produce/tail). Other serve settings are
#: read from --config and RNND_* as serve reads them, but change nothing here, so they are
#: not offered as flags: a flag that does nothing would be silently ignored.
_SETTINGS = ("model", "bootstrap_servers", "input_topic", "output_topic", "dead_letter_topic", "group_id",
             "changelog", "changelog_topic", "on_state_mismatch", "previous_model", "client_id", "route")


# --- argument parsing -------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``topics`` (with its action ``create``) on the ``rnnd`` command's subparsers."""
    p = sub.add_parser("topics", help="create the input, output, dead-letter and changelog topics `rnnd serve` uses",
                       description="Manage the topics of an rnnd deployment.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser(
        "create", help="create the topics `rnnd serve` uses (idempotent)",
        description="Create the input, output, dead-letter and state changelog topics that `rnnd serve` with the "
        "same settings will use: same flags, RNND_* variables and --config file as serve, so the names match (the "
        "dead-letter topic defaults to <input_topic>.dlq, the changelog to <group_id>.<input_topic>.changelog with "
        "group_id rnnd-<model name>). Every topic gets the same partition count; the changelog is compacted. "
        "Topics that exist with that count are reported as existing; one with another count is an error (exit 2).")
    c.add_argument("--config", help="the TOML config file `rnnd serve` uses (or RNND_CONFIG)")
    serve_settings = {s.name: s for s in serve_config.settings_of()}
    helps = {name: s.help for name, s in serve_settings.items()}
    types = {name: s.type for name, s in serve_settings.items()}
    choices = {name: s.choices for name, s in serve_settings.items()}
    for name in _SETTINGS:
        flag = f"--{name.replace('_', '-')}"
        text = f"{helps[name]} [env {serve_config.ENV_PREFIX}{name.upper()}]"
        if name == "model":
            text += " Needed only when the changelog's name comes from the model's name."
        if types[name] is bool:
            c.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            c.add_argument(flag, dest=name, default=None, metavar=name.upper(), choices=choices[name], help=text)
    c.add_argument("--partitions", type=positive_int, default=None, metavar="N",
                   help="partitions of every topic (default: the input topic's count if it exists, else "
                        f"{DEFAULT_PARTITIONS}); they bound how many replicas can share the work")
    c.add_argument("--replication-factor", type=positive_int, default=None, metavar="R",
                   help="replicas of each new topic (default: the number of brokers, at most 3)")
    c.add_argument("--dry-run", action="store_true",
                   help="print what would be created (the broker is read, nothing is changed)")
    security.add_arguments(c)
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    c.set_defaults(run=create)


# --- names ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTopic:
    role: str  # input, output, dead-letter, changelog
    name: str
    configs: dict[str, str] = dataclasses.field(default_factory=dict)


def load_settings(args: argparse.Namespace) -> ServeConfig:
    """The serve settings from flags > RNND_* > --config file > defaults, exactly as `rnnd serve` loads them.

    ``model`` is required by serve; here only when the changelog's name is derived from the
    model's name, which :func:`plan_names` checks, so the model is given a placeholder when
    nothing sets it.
    """
    given = {name: getattr(args, name, None) for name in _SETTINGS}
    for f in fields(security.KafkaSecurity):
        given[f.name] = getattr(args, f.name, None)
    config_file = getattr(args, "config", None)
    try:
        return serve_config.load(given, config_file=config_file)
    except ConfigError as e:
        if str(e) != f"model is required: {serve_config.spellings('model')}":
            raise
    return dataclasses.replace(serve_config.load({**given, "model": _NO_MODEL}, config_file=config_file),
                               model="")


_NO_MODEL = "(no model given)"


def _model_name(cfg: ServeConfig) -> str:
    """The name of the model `rnnd serve` will serve with these settings (it names the default group).

    With on_state_mismatch=previous the daemon serves previous_model when the new model's
    state layout differs, and so takes its group from that model's name; this follows it.
    """
    from rnnd.daemon.bundle import read_spec

    spec = read_spec(cfg.model)
    if cfg.on_state_mismatch == "previous" and cfg.previous_model:
        previous = read_spec(cfg.previous_model)
        if previous.state_hash != spec.state_hash:
            return previous.model.name
    return spec.model.name


def plan_names(cfg: ServeConfig) -> list[PlannedTopic]:
    """The topics `rnnd serve` with ``cfg`` reads and writes, named by the daemon's own rules."""
    planned = [PlannedTopic("input", cfg.input_topic), PlannedTopic("output", cfg.output_topic),
               PlannedTopic("dead-letter", cfg.dlq_topic)]
    if cfg.changelog:
        if not cfg.group_id and not cfg.changelog_topic:
            if not cfg.model:
                raise ToolError("the changelog topic is named after the consumer group, rnnd-<model name> by "
                                "default: give --model (as for `rnnd serve`), or --group-id or --changelog-topic, "
                                "or --no-changelog")
            name = _model_name(cfg)
        else:
            name = ""  # not used: the group or the topic is set
        _, topic = names.group_and_topic(cfg.group_id, cfg.changelog_topic, cfg.input_topic, name)
        planned.append(PlannedTopic("changelog", topic, dict(changelog.TOPIC_CONFIGS)))
    seen: dict[str, str] = {}
    for t in planned:
        if t.name in seen:
            raise ToolError(f"the {seen[t.name]} and {t.role} topics are both {t.name!r}: give each its own name")
        seen[t.name] = t.role
    return planned


# --- talking to the broker --------------------------------------------------------------------

def create(args: argparse.Namespace) -> int:
    """Run ``rnnd topics create``; returns the exit status (errors are raised with their exit code)."""
    if not logging.getLogger().handlers:
        logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    from rnnd.daemon.kafka import client_settings

    given = {name: getattr(args, name, None) for name in _SETTINGS}
    for f in fields(security.KafkaSecurity):
        given[f.name] = getattr(args, f.name, None)
    routes = serve_config.load_routes(given, config_file=getattr(args, "config", None))
    # Every route of a config file with routes (each its topics, co-partitioned with its own input), or the one
    for name, cfg in (routes or {"": load_settings(args)}).items():
        planned = plan_names(cfg)
        kafka = {**client_settings(cfg), "client_id": f"{cfg.client_id}-topics"}
        for line in asyncio.run(_create(kafka, planned, args.partitions, args.replication_factor, args.dry_run)):
            print(f"route {name}: {line}" if name else line, flush=True)
    return 0


async def _create(kafka: dict[str, Any], planned: list[PlannedTopic], partitions: int | None,
                  replication: int | None, dry_run: bool, timeout_s: float = 20.0) -> list[str]:
    from aiokafka.admin import NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    from rnnd.daemon.kafka import admin as admin_client
    from rnnd.daemon.kafka import default_replication

    bootstrap = kafka["bootstrap_servers"]
    admin = admin_client(kafka, kafka["client_id"], request_timeout_ms=10_000)
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout=timeout_s)
            existing = await _partition_counts(admin)
        except (TimeoutError, KafkaError, OSError) as e:
            raise ToolError(f"cannot reach Kafka at {bootstrap}: {e!r}", exit_code=1) from None

        input_topic = planned[0].name
        want = partitions or existing.get(input_topic) or DEFAULT_PARTITIONS
        wrong = [f"{t.role} topic {t.name!r} has {existing[t.name]} partitions, not {want}"
                 for t in planned if t.name in existing and existing[t.name] != want]
        if wrong:
            if input_topic in existing and existing[input_topic] != want:
                fix = (f"an existing topic's partition count is not changed here: use --partitions "
                       f"{existing[input_topic]}, or delete the topic and run this again")
            else:
                fix = ("every topic gets the input's partition count (the changelog must be co-partitioned with "
                       "it): delete that topic and run this again, or name another one")
            raise ToolError(f"{'; '.join(wrong)}: {fix}")
        await _check_configs(admin, [t for t in planned if t.name in existing and t.configs])

        todo = [t for t in planned if t.name not in existing]
        if replication is None and todo:
            replication = await default_replication(admin)
        lines = _report(planned, existing, want, "would create" if dry_run else "created", replication)
        if dry_run or not todo:
            return lines

        new = [NewTopic(t.name, num_partitions=want, replication_factor=replication, topic_configs=dict(t.configs))
               for t in todo]
        try:
            resp = await admin.create_topics(new)
        except KafkaError as e:
            raise ToolError(f"Kafka at {bootstrap} did not create the topics: {e!r}", exit_code=1) from None
        raced: set[str] = set()
        for name, code, *rest in resp.topic_errors:
            if code == 0:
                continue
            err = for_code(code)
            if err is TopicAlreadyExistsError:  # made by someone else meanwhile: checked below like the others
                raced.add(name)
                continue
            detail = f" ({rest[0]})" if rest and rest[0] else ""
            raise ToolError(f"Kafka at {bootstrap} refused to create topic {name!r}: {err.__name__}{detail}")
        counts = await _wait_visible(admin, {t.name for t in todo}, timeout_s)
        for name in raced:
            if counts[name] != want:
                raise ToolError(f"topic {name!r} was created by someone else meanwhile, with {counts[name]} "
                                f"partitions, not {want}")
        return _report(planned, existing | {n: counts[n] for n in raced}, want, "created", replication)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _partition_counts(admin: Any) -> dict[str, int]:
    """Partition count of every topic, looked up without creating any."""
    from rnnd.daemon.kafka import topic_partitions

    return {topic: len(parts) for topic, parts in (await topic_partitions(admin)).items()}


async def _check_configs(admin: Any, topics: list[PlannedTopic]) -> None:
    """An existing changelog that is not compacted would lose streams' state to retention: refuse it."""
    if not topics:
        return
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.errors import KafkaError

    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.name) for t in topics])
    except KafkaError as e:
        raise ToolError(f"cannot read the configs of {', '.join(t.name for t in topics)}: {e!r}", exit_code=1) \
            from None
    have: dict[str, dict[str, str]] = {}
    for resp in responses:
        for code, _msg, _type, name, entries, *_ in resp.resources:
            if code == 0:
                have[name] = {e[0]: e[1] for e in entries}
    for t in topics:
        if t.name not in have:
            raise ToolError(f"cannot read the configs of {t.role} topic {t.name!r}", exit_code=1)
        for key, value in t.configs.items():
            got = have[t.name].get(key)
            if key == "cleanup.policy":  # a list ("compact,delete" also compacts); unset means Kafka's "delete"
                got = got or "delete"
                ok = value in got.split(",")
            else:
                ok = got == value
            if not ok:
                raise ToolError(f"{t.role} topic {t.name!r} exists with {key}={got}, not {value}: set it "
                                f"(kafka-configs --alter --add-config {key}={value}) or recreate the topic")


async def _wait_visible(admin: Any, names: set[str], timeout_s: float) -> dict[str, int]:
    """Partition counts once metadata shows every topic in ``names`` (creation is asynchronous on Kafka)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = await _partition_counts(admin)
        if names <= set(counts):
            return counts
        if time.monotonic() > deadline:
            raise ToolError(f"topics {sorted(names - set(counts))} were created but do not show in metadata after "
                            f"{timeout_s:.0f} s", exit_code=1)
        await asyncio.sleep(0.2)


def _report(planned: list[PlannedTopic], existing: dict[str, int], want: int, verb: str,
            replication: int | None) -> list[str]:
    """One line per topic, status first so that scripts can grep it: ``created  input  sensors  4 partitions``."""
    role_w = max(len(t.role) for t in planned)
    name_w = max(len(t.name) for t in planned)
    verb_w = max(len(verb), len("exists"))
    lines = []
    for t in planned:
        status = "exists" if t.name in existing else verb
        n = existing.get(t.name, want)
        line = f"{status:<{verb_w}}  {t.role:<{role_w}}  {t.name:<{name_w}}  {n} partition{'s' if n != 1 else ''}"
        if t.name not in existing and replication is not None:
            line += f", replication {replication}"
        if t.configs:
            line += ", " + ", ".join(f"{k}={v}" for k, v in t.configs.items())
        lines.append(line.rstrip())
    return lines
