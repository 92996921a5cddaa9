"""The daemon: the pipeline wired to Kafka, plus checkpoints, backpressure, rebalances, health and shutdown.

    daemon        Daemon: builds the parts below and hands each its collaborators; run/stop/drain/close
    loops         the fetch loop (with backpressure) and the infer loop: the serving hot path
    publish       predictions and dead letters to the sink
    checkpoint    Checkpointer (outputs → changelog → offsets, numbered steps) and the two locks
    rebalance     Rebalancer: checkpoint on revocation, restore on assignment
    models        which bundle is served (on_state_mismatch=previous), and the provider report
    housekeeping  readiness, TTL eviction, consumer lag, the broker watch
    clients       the Kafka client factory (aiokafka's, or a test's fakes) and the live clients
    budgets       every time budget, named, with the reason for its value
    run           serve(): the process around one Daemon (GC settings, event loop)
    workers       ``--workers N``: N daemon processes in one group behind one endpoint, stopped together

Five tasks share one event loop: fetch, infer, checkpoint (every ``commit_interval_s``),
housekeeping and the broker watch. Model calls run on one worker thread.
"""

from __future__ import annotations

from .daemon import Daemon
from .run import serve

__all__ = ["Daemon", "serve"]
