"""Errors the CLI turns into one-line messages and exit codes (no traceback)."""


class ConfigError(ValueError):
    """Bad user input: names the key and what is allowed."""


class MemoryBudgetExceeded(RuntimeError):
    """A run went over run.memory_budget_mib; recorded as status `oom`, with the peak it reached and the budget."""

    def __init__(self, message: str, peak_bytes: int, budget_mib: float, source: str):
        super().__init__(message)
        self.peak_bytes, self.budget_mib, self.source = peak_bytes, budget_mib, source
