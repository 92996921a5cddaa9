"""Which bundle the daemon serves, and how it says so (log line and ``rnnd_model_info``).

Model upgrades meet durable state here: a new bundle whose state layout (``state_hash``)
differs from the one the changelog holds cannot continue those streams. With
``on_state_mismatch=previous`` the daemon then keeps serving ``previous_model`` and says so
loudly, so that a rollout of an incompatible model is a visible no-op, not a reset of every
stream's state.

A hot reload (``reload``) asks the same question of the bundle serving and the one offered
(``upgrade.upgrade``), with one more: whether the steps already queued are input for it too.
"""

from __future__ import annotations

import logging

from ..config import ServeConfig
from ..errors import ConfigError
from ..metrics import Metrics
from ..runtime import BundleModel, ProviderChoice, open_served

log = logging.getLogger("rnnd.daemon")


def open_model(cfg: ServeConfig) -> tuple[BundleModel, ProviderChoice]:
    """The bundle to serve (``cfg.model``, or ``previous_model`` by the policy above) and its provider."""
    model, provider = open_served(cfg.model, cfg)
    return choose_model(cfg, model), provider


def choose_model(cfg: ServeConfig, model: BundleModel) -> BundleModel:
    """Model upgrade policy 'previous': keep serving the old bundle if the new state layout differs."""
    if cfg.on_state_mismatch != "previous":
        return model
    if not cfg.previous_model:
        raise ConfigError("on_state_mismatch=previous needs previous_model (the bundle whose state the "
                          "changelog holds)")
    previous, _ = open_served(cfg.previous_model, cfg)
    if previous.spec.state_hash == model.spec.state_hash:
        log.info("%s keeps the state layout of %s: streams continue on the new model", model.spec.model.ref,
                 previous.spec.model.ref)
        return model
    log.warning("%s has another state layout (%s) than %s (%s): KEEP SERVING %s (on_state_mismatch=previous); "
                "switch with on_state_mismatch=reset", model.spec.model.ref, model.spec.state_hash,
                previous.spec.model.ref, previous.spec.state_hash, previous.spec.model.ref)
    return previous


def report_model(metrics: Metrics, model: BundleModel, choice: ProviderChoice) -> None:
    """A fallback to CPU is logged as a warning: ONNX Runtime alone would fall back silently."""
    spec = model.spec
    if choice.fallback:
        log.warning("provider %s is not available: FALLING BACK to %s (provider_fallback=true)",
                    choice.requested, choice.actual)
    metrics.model_info.labels(spec.model.name, spec.model.version, choice.label, choice.requested,
                              str(choice.fallback).lower(), spec.state_hash).set(1)


def retire_model(metrics: Metrics, model: BundleModel, choice: ProviderChoice) -> None:
    """``rnnd_model_info`` of a bundle that no longer serves: its series goes (not left at 1 beside the new one)."""
    spec = model.spec
    metrics.model_info.remove(spec.model.name, spec.model.version, choice.label, choice.requested,
                              str(choice.fallback).lower(), spec.state_hash)
