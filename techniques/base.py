"""The technique contract lives in the harness (membench/technique.py: Technique, Patch, Context, Prediction,
States and the registry); technique modules import it from here."""

from membench.technique import Context, Patch, Prediction, States, Technique

__all__ = ["Context", "Patch", "Prediction", "States", "Technique"]
