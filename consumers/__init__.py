"""slipstream: consumers package."""
