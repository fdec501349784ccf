"""slipstream: pipeline package."""
