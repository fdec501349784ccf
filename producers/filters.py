"""Built-in group filters (dynamic sampling, as in DAPO).

A group whose rewards are all equal has zero advantage for every sample under GRPO, so it only
costs a training slot.  ``producer.group_filter = "producers.filters:drop_uniform"`` drops such
groups before they are sent; the producer keeps the credit and generates another prompt, and counts
the drop in ``slipstream_producer_groups_filtered_total{reason}``.
"""

from __future__ import annotations

from producers.plugins import Sample


def drop_uniform(samples: list[Sample]) -> str | None:
    """Drop a group whose rewards are all equal: reason ``all_zero``, ``all_one`` or ``all_equal``."""
    rewards = [s.reward for s in samples]
    if len(rewards) < 2 or any(r != rewards[0] for r in rewards):
        return None
    if rewards[0] == 0.0:
        return "all_zero"
    if rewards[0] == 1.0:
        return "all_one"
    return "all_equal"


drop_uniform.reasons = ("all_zero", "all_one", "all_equal")  # type: ignore[attr-defined]
