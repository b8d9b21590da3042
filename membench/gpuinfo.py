"""NVML readings for a CUDA device (placeholder API; the multi-GPU work replaces this module)."""

from __future__ import annotations


def handle(device):
    if getattr(device, "type", None) != "cuda":
        return None
    try:
        import pynvml

        import torch

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - no NVML: the record simply has no NVML figures
        return None


def used_bytes(h) -> int | None:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)


def energy_mj(h) -> int | None:
    import pynvml

    try:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
    except pynvml.NVMLError:
        return None
