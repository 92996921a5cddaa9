"""Whether a bundle may take over streams another one serves, while serving (a hot reload), and how.

Three answers: ``continue`` (the same state layout: every stream goes on with its state and
step count), ``reset`` (another layout, and ``on_state_mismatch=reset``: every stream starts
over on the new bundle), ``refuse`` (the serving bundle stays). The policy applies only to the
state layout. An input that reads differently is always refused: the steps already queued
were decoded for the serving bundle's input (a restart serves such a bundle). So is a new
model name while the consumer group and changelog are named after the model: after the next
restart the daemon would join another group and find none of its streams' state.

The daemon's reload (service/reload.py) and ``local.Session.swap`` both ask here.
"""

from __future__ import annotations

from typing import NamedTuple

from .bundle import BundleSpec
from .config import ServeConfig


class Upgrade(NamedTuple):
    """What a hot reload does with a bundle: ``continue`` every stream, ``reset`` them all, or ``refuse`` it."""

    action: str
    why: str


def upgrade(serving: BundleSpec, new: BundleSpec, cfg: ServeConfig) -> Upgrade:
    """Whether ``new`` may take over from ``serving`` while serving, and how (the module docstring)."""
    old_input, new_input = input_contract(serving), input_contract(new)
    if old_input != new_input:
        what = next(name for name, a, b in zip(_CONTRACT, old_input, new_input, strict=True) if a != b)
        return Upgrade("refuse", f"it differs from {serving.model.ref} in its {what}, so the steps already queued are "
                                 "not its input: restart the daemon with it")
    if new.model.name != serving.model.name and not (cfg.group_id and cfg.changelog_topic):
        return Upgrade("refuse", f"its model name {new.model.name!r} is not {serving.model.name!r}: after a restart it "
                                 f"would join group rnnd-{new.model.name} and read another changelog (its streams' "
                                 "state lost); set group_id and changelog_topic to keep them")
    if new.state_hash == serving.state_hash:
        return Upgrade("continue", "the same state layout: every stream continues on it")
    layouts = f"another state layout ({new.state_hash}) than {serving.model.ref} ({serving.state_hash})"
    if cfg.on_state_mismatch == "reset":
        return Upgrade("reset", f"{layouts}: every stream restarts from its initial state (on_state_mismatch=reset)")
    return Upgrade("refuse", f"{layouts}: the streams' state cannot continue on it (on_state_mismatch="
                             f"{cfg.on_state_mismatch}); restart with on_state_mismatch=reset to start them over on it")


#: What ``input_contract`` compares, by name, for the refusal's message.
_CONTRACT = ("mode", "input kind", "input features", "tokenizer", "window", "context size", "maximum source length")


def input_contract(spec: BundleSpec) -> tuple:
    """What decides how a message decodes into steps, and what a queued step is to the model."""
    return (spec.mode, spec.input.kind, spec.input.features, spec.input.tokenizer, spec.window,
            spec.start.size if spec.start is not None else None,
            spec.seq2seq.max_source_len if spec.seq2seq is not None else None)
