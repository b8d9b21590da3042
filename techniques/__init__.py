"""Memory-saving techniques: each module holds a config dataclass with one verb, `apply(model, ctx) -> Patch`."""
