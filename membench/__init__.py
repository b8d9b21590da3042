"""membench: measured memory/time/quality trade-offs of memory-saving training techniques."""

SCHEMA_VERSION = 1
