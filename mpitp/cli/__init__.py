"""The command lines (generate) and the fail-safe runner every command starts through (runner)."""
