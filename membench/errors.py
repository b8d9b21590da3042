"""Errors the CLI turns into one-line messages and exit codes (no traceback)."""


class ConfigError(ValueError):
    """Bad user input: names the key and what is allowed."""


class MemoryBudgetExceeded(RuntimeError):
    """A run went over run.memory_budget_mib; recorded as status `oom`."""
