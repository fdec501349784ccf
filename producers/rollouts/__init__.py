"""Built-in rollouts beyond single-turn (see :mod:`producers.rollout` for the interface)."""
