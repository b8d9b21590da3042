"""membench: measured memory/time/quality trade-offs of memory-saving training techniques."""

SCHEMA_VERSION = 2  # 2: memory by device and by phase; peak_bytes is the device peak of plain steps (CUDA)
