"""slipstream: producers package."""
