"""Every time budget and pacing interval of the daemon, named once, each with the reason for its value.

The shutdown budgets are sized together: a stopping daemon drains (``DRAIN_S``), checkpoints
(``FINAL_CHECKPOINT_S``), then stops its consumer and its producer (``CLIENT_STOP_S`` each),
30 + 30 + 15 + 15 = 90 s, which is the ``terminationGracePeriodSeconds`` of
deploy/k8s/deployment.yaml: the orchestrator's SIGKILL never lands in the middle of a step it
could have waited for. Whatever a budget cuts short is not lost: inputs whose outputs, state
or offsets did not make it are read again by the partition's next owner.
"""

from __future__ import annotations

# --- shutdown ----------------------------------------------------------------------------------
#: After stop(): how long queued steps may keep running before the final checkpoint. A queue
#: held to ``max_inflight_steps`` is normally worked off in well under this; a model that is
#: slower leaves the rest unapplied and uncommitted, for the next owner.
DRAIN_S = 30.0
#: The final checkpoint's patience with a broker that does not acknowledge (or, under exactly-once,
#: does not answer the transactions' commits): one producer ``request_timeout_ms`` (30 s,
#: kafka.producer_settings). A broker that is gone is not waited for longer; the inputs behind the
#: unacknowledged outputs (or the open transactions, which the broker aborts) are re-read later.
FINAL_CHECKPOINT_S = 30.0
#: Each of ``consumer.stop()`` (leaves the group, so partitions move on at once rather than after
#: ``session_timeout_ms``) and ``producer.stop()``. Half a checkpoint's budget: by then every
#: output has been flushed or given up on, so there is little left for either to wait for.
CLIENT_STOP_S = 15.0

# --- exactly-once --------------------------------------------------------------------------------
#: The probe at connect (a transactional producer's start and first transaction): a broker
#: answers within a second or two; one that does not is treated as unreachable and retried.
TRANSACTION_PROBE_S = 15.0
#: After a partition's transaction failed: the first wait before its producer is started again
#: and its state restored, doubled per failure up to the max (a broker restart takes seconds).
RECOVER_BACKOFF_S = 0.5
RECOVER_BACKOFF_MAX_S = 10.0
#: A fenced partition (another producer took its transactional id) is taken back after this many
#: session timeouts unless a revocation comes first. A real new owner means this member was
#: dropped from the group, which its consumer learns at the next heartbeat (well within one
#: session timeout); two leave room for a slow rejoin. No revocation by then means there was no
#: new owner: the broker had aborted a transaction that ran past its timeout.
FENCED_WAIT_SESSIONS = 2

# --- rebalance ---------------------------------------------------------------------------------
#: A revocation finishes the partition's queued steps before its checkpoint, as a shutdown does
#: (a graceful rebalance repeats nothing), for at most this long: the rest of the group waits
#: for this member to rejoin, and a stuck model must not hold the whole group's rebalance.
REVOCATION_WAIT_S = 30.0
#: How often a waiting revocation (and the drain) looks at the queue again: short next to a
#: model call, so a partition moves on promptly once its last step is applied.
REVOCATION_POLL_S = 0.005
DRAIN_POLL_S = 0.01
#: Restore progress is logged at most this often: a long restore says it is alive, a short one
#: says nothing until it is done.
RESTORE_LOG_EVERY_S = 2.0

# --- connecting and fetching -------------------------------------------------------------------
#: The first wait after a failed connect, doubled per failure up to ``CONNECT_BACKOFF_MAX_S``:
#: a broker that is starting is caught within a second, one that is down is asked every 10 s
#: (not hammered), and one that comes back is noticed within those 10 s.
CONNECT_BACKOFF_S = 0.5
CONNECT_BACKOFF_MAX_S = 10.0
#: How long one fetch waits for data when none is buffered: how quickly the fetch loop notices
#: stop() and a change of backpressure on a quiet topic.
FETCH_POLL_MS = 100
#: After a fetch that raised: a pause, so an outage is not a busy loop of failing fetches.
FETCH_RETRY_S = 1.0
#: A fetch's records are decoded and queued this many at a time, the event loop handed on between
#: slices: at ~10 µs a record a slice holds the loop ~5 ms, so a backlog's 10,000-record fetches
#: never keep a finished model call waiting for its outputs to be sent (nor /metrics for an answer).
INTAKE_SLICE = 500
#: When every stream slot holds a stream with queued steps, the fetch loop waits this long for
#: the model to free one: short, since it holds up the whole partition's fetch.
SLOT_WAIT_S = 0.002

# --- housekeeping and readiness ----------------------------------------------------------------
#: The event-loop watch's timer: it asks to be woken this often and records how late it is. Short
#: enough to see a hold of a few milliseconds (the target is none over 50 ms), long enough that
#: its 100 wake-ups a second cost nothing measurable.
LOOP_LAG_PROBE_S = 0.01
#: TTL eviction, the eviction log and the consumer-lag gauge are refreshed this often: TTLs are
#: seconds to hours, and Prometheus scrapes every 15 s or so.
HOUSEKEEP_INTERVAL_S = 1.0
#: How long the lag gauge waits for a partition's position (a broker round trip when the
#: consumer has none yet); it skips the partition until the next round rather than wait.
LAG_POSITION_TIMEOUT_S = 0.5
#: How often the broker is asked whether it is there (``kafka.broker_answers``), and how long an
#: answer may take. Short next to ``broker_unreachable_s`` (10 s by default), so that readiness
#: follows an outage and a recovery within about a second of that setting.
BROKER_CHECK_INTERVAL_S = 1.0
BROKER_CHECK_TIMEOUT_S = 2.0

# --- hot reload ----------------------------------------------------------------------------------
#: How often the model path is looked at (``watch_model``): one stat, so cheap; a new bundle is
#: taken up within two of these (it must hold still for one, see ``reload``).
WATCH_POLL_S = 1.0
#: After a reload's checkpoint that did not commit (a broker outage): the next try. The periodic
#: checkpoint's own pace, so a reload never adds commits that the outage would only refuse.
RELOAD_RETRY_S = 1.0
#: How long POST /admin/reload waits for its answer. Loading and self-checking a bundle takes
#: well under a second; the swap waits for one checkpoint (``commit_interval_s``) and, under a
#: broker outage, for one that commits. Past this the answer says "still waiting" (202) and the
#: swap still happens; the log and ``rnnd_model_info`` say when.
ADMIN_ANSWER_S = 30.0
