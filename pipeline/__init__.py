"""slipstream: pipeline package (queue, broker, launcher, CLI, config, metrics)."""

__version__ = "0.1.0"
