"""CLI, engine wiring and (later) the HTTP layer."""
