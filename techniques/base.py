"""The technique contract lives in the harness (membench/technique.py: Technique, Patch, Context, Prediction,
States and the registry); technique modules import it from here."""

from membench.technique import STEP_PHASES, Context, Patch, Prediction, States, Technique

__all__ = ["STEP_PHASES", "Context", "Patch", "Prediction", "States", "Technique"]
