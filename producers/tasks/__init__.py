"""Built-in verifiable tasks (prompt sources + rewards)."""
