"""The names a deployment's topics and consumer group get when the settings leave them unset.

One place for `rnnd serve`, its settings checks and `rnnd topics create`, so that topics made
ahead of time are exactly the ones the daemon then uses. Pure string rules: importing this
loads nothing else.
"""

from __future__ import annotations

#: The derivations as the settings' help and error messages spell them.
DEAD_LETTER_RULE = "<input_topic>.dlq"
CHANGELOG_RULE = "<group_id>.<input_topic>.changelog"


def dead_letter_topic(input_topic: str) -> str:
    return f"{input_topic}.dlq"


def default_group(model_name: str) -> str:
    return f"rnnd-{model_name}"


def changelog_topic(group_id: str, input_topic: str) -> str:
    return f"{group_id}.{input_topic}.changelog"


def group_and_topic(group_id: str, changelog: str, input_topic: str, model_name: str) -> tuple[str, str]:
    """A deployment's consumer group and changelog topic: as set, or derived from the model's name."""
    group = group_id or default_group(model_name)
    return group, changelog or changelog_topic(group, input_topic)
