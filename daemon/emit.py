"""Which predictions go out, and when: the ``emit`` and ``warmup`` settings as one set of rules.

* ``every``      every step's prediction, as it is made
* ``every:N``    the predictions of steps N, 2N, 3N, ... of a stream (counted from its start or
                 its last reset)
* ``end``        only a stream's last prediction, once an ``end`` control closes the stream (the
                 pipeline marks it ``"ended": true``); a reset or an eviction before the end
                 discards it
* ``warmup=hold`` with any of these: nothing from a stream's first ``warmup_steps`` steps, so an
                 ``end`` that closes a stream still in its warm-up emits nothing

The daemon (``Pipeline``) and its offline oracle (``rnnd verify``) both route predictions
through an ``Emitter``: the oracle expects exactly what the daemon emits because there is only
one statement of the rules. Items are opaque to it (the pipeline's output records, verify's
prediction ids).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from .config import ServeConfig

T = TypeVar("T")


class Emitter(Generic[T]):
    """The rules, applied to one model call's predictions at a time.

    The layout is a model call's: streams ``slots``, ``t`` steps each; position ``i`` is
    stream ``slots[i // t]`` at its step ``steps[i]`` (0-based). ``wanted`` names the positions
    whose predictions matter, so that nothing else is encoded: with every/every:N they go out
    now; with end (``at_end``) the caller hands them to ``keep`` and gets a stream's last one
    back from ``ended``. What is kept is the caller's choice (T).
    """

    __slots__ = ("_last", "at_end", "every", "every_step", "first", "hold_warmup")

    def __init__(self, every: int, hold_warmup: bool, warmup_steps: int) -> None:
        self.every = every  # 1: every step, N: every Nth, 0: at the end only
        self.at_end = every == 0
        self.hold_warmup = hold_warmup
        self.warm_up(warmup_steps)
        self._last: dict[int, T] = {}  # emit=end: per stream slot, what was kept of its latest prediction

    def warm_up(self, warmup_steps: int) -> None:
        """The bundle's warm-up (set again when a hot reload brings another bundle)."""
        self.first = warmup_steps if self.hold_warmup else 0  # the first step whose prediction may go out
        self.every_step = self.every == 1 and self.first == 0  # the default: everything, no per-step test

    @classmethod
    def from_config(cls, cfg: ServeConfig, warmup_steps: int) -> Emitter[T]:
        return cls(cfg.emit_every, cfg.warmup == "hold", warmup_steps)

    def wanted(self, steps: list[int], slots: list[int], t: int) -> list[int] | None:
        """The positions whose predictions go out now (or, ``at_end``, may go out when their stream
        ends), in order; None: every position."""
        if self.every_step:
            return None
        every, first = self.every, self.first
        if every == 0:  # each stream's latest step in this call (its steps count up)
            return [j for j in range(t - 1, len(slots) * t, t) if steps[j] >= first]
        return [i for i, step in enumerate(steps) if step >= first and (step + 1) % every == 0]

    def keep(self, items: list[T], positions: list[int], slots: list[int], t: int) -> None:
        """emit=end: ``items`` for ``wanted``'s positions; each replaces what its stream had kept."""
        last = self._last
        for item, j in zip(items, positions, strict=True):
            last[slots[j // t]] = item

    def ended(self, slot: int) -> T | None:
        """The stream in ``slot`` was closed by an ``end`` control: what was kept for it (emit=end)."""
        return self._last.pop(slot, None)

    def forget(self, slot: int) -> None:
        """The stream restarted (reset) or left (evicted, revoked): its last prediction never goes out."""
        self._last.pop(slot, None)
