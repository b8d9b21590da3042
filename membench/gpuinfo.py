"""What NVML says about a CUDA device: memory the driver counts as used, the energy counter, other processes on
the device, and the provenance a record needs (driver, clocks, power limit, ECC, name, UUID).

Uses nvidia-ml-py (`import pynvml`), the NVIDIA-maintained binding. Every function returns None (or [] / {})
when NVML or the device is absent, so CPU runs call them unconditionally. `handle(None)` or a CPU device is None.
The device-busy guard (`wait_until_free`) is called by the parent before it starts a CUDA cell's child, so its
wait does not eat the cell's timeout and no CUDA context of ours is on the device while it looks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

_state: dict[str, Any] = {}


def _nvml():
    """The initialised pynvml module, or None without the library or a driver (cached per process)."""
    if "nvml" not in _state:
        try:
            import pynvml

            pynvml.nvmlInit()
            _state["nvml"] = pynvml
        except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
            _state["nvml"] = None
    return _state["nvml"]


def _visible(index: int, env: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry behind CUDA ordinal `index` (None: the variable is unset)."""
    if env is None:
        return None
    entries = [e.strip() for e in env.split(",") if e.strip()]
    return entries[index] if index < len(entries) else ""


def handle(device, visible: str | None = None) -> Any | None:
    """NVML handle of a torch device ("cuda", "cuda:1", torch.device or a CUDA ordinal), None without one.
    In a process where CUDA is initialised the device's UUID is used (exact whatever CUDA_DEVICE_ORDER says);
    otherwise the ordinal is mapped through CUDA_VISIBLE_DEVICES (indices or UUIDs; `visible` stands in for
    this process's variable, e.g. the value a scheduler gives a cell's child) to NVML's numbering."""
    nv = _nvml()
    if nv is None or device is None:
        return None
    if isinstance(device, int):
        index = device
    else:
        kind, _, idx = str(device).partition(":")
        if kind != "cuda":
            return None
        index = int(idx) if idx else None
    try:
        import torch

        if torch.cuda.is_initialized():  # a bare "cuda" is the current device (a rank's own, after set_device)
            index = torch.cuda.current_device() if index is None else index
            return nv.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
    except Exception:  # noqa: BLE001 - torch without CUDA, a MIG slice (no GPU- UUID): fall back to the ordinal
        pass
    index = 0 if index is None else index
    entry = _visible(index, os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible)
    try:
        if entry is None or entry.isdigit():
            return nv.nvmlDeviceGetHandleByIndex(index if entry is None else int(entry))
        return nv.nvmlDeviceGetHandleByUUID(entry) if entry else None
    except nv.NVMLError:
        return None


def _call(fn: Callable, *args):
    nv = _nvml()
    try:
        return fn(*args)
    except nv.NVMLError:  # NotSupported (energy before Volta, ECC on consumer cards), NoPermission...
        return None


def used_bytes(h) -> int | None:
    """Device memory in use as the driver counts it (all processes, plus the CUDA contexts), in bytes."""
    if h is None:
        return None
    info = _call(_nvml().nvmlDeviceGetMemoryInfo, h)
    return None if info is None else int(info.used)


def energy_mj(h) -> int | None:
    """The device's energy counter in millijoules since the driver loaded (Volta and newer); difference two
    readings for the energy of what ran between them."""
    if h is None:
        return None
    mj = _call(_nvml().nvmlDeviceGetTotalEnergyConsumption, h)
    return None if mj is None else int(mj)


def busy_processes(h, exclude: set[int] | None = None) -> list[dict] | None:
    """Processes other than this one (and `exclude`) holding the device: [{pid, used_bytes, kind}]. PIDs are
    as NVML sees them (the host's namespace inside a container)."""
    if h is None:
        return None
    nv, skip = _nvml(), {os.getpid(), *(exclude or ())}
    out: dict[int, dict] = {}
    lists = (
        ("compute", nv.nvmlDeviceGetComputeRunningProcesses),
        ("graphics", nv.nvmlDeviceGetGraphicsRunningProcesses),
    )
    for kind, fn in lists:
        for p in _call(fn, h) or []:
            if p.pid not in skip and p.pid not in out:
                mem = p.usedGpuMemory
                out[p.pid] = {"pid": int(p.pid), "used_bytes": None if mem is None else int(mem), "kind": kind}
    return list(out.values())


def _text(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def provenance(h) -> dict | None:
    """What decides a device's numbers besides the code: name, UUID, driver, clocks now / max / application
    (MHz), power limit (W), ECC mode, total memory. Fields NVML does not support on the device are None."""
    if h is None:
        return None
    nv = _nvml()
    sm, mem = nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM
    limit = _call(nv.nvmlDeviceGetEnforcedPowerLimit, h)
    ecc = _call(nv.nvmlDeviceGetEccMode, h)
    info = _call(nv.nvmlDeviceGetMemoryInfo, h)
    cc = _call(nv.nvmlDeviceGetCudaComputeCapability, h)
    return {
        "name": _text(_call(nv.nvmlDeviceGetName, h)),
        "uuid": _text(_call(nv.nvmlDeviceGetUUID, h)),
        "driver": _text(_call(nv.nvmlSystemGetDriverVersion)),
        "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
        "memory_total_bytes": None if info is None else int(info.total),
        "clocks_mhz": {
            "sm": _call(nv.nvmlDeviceGetClockInfo, h, sm),
            "mem": _call(nv.nvmlDeviceGetClockInfo, h, mem),
            "sm_max": _call(nv.nvmlDeviceGetMaxClockInfo, h, sm),
            "mem_max": _call(nv.nvmlDeviceGetMaxClockInfo, h, mem),
            "sm_app": _call(nv.nvmlDeviceGetApplicationsClock, h, sm),
            "mem_app": _call(nv.nvmlDeviceGetApplicationsClock, h, mem),
        },
        "power_limit_w": None if limit is None else limit / 1000,
        "ecc": None if ecc is None else {"current": bool(ecc[0]), "pending": bool(ecc[1])},
    }


def cell_devices(run: dict, visible: str | None = None) -> list[int]:
    """CUDA ordinals (as the cell's child will number them) a cell will use: one per rank; [] for a CPU cell.
    device=auto counts as CUDA when NVML sees a device, which is what the child's torch will pick."""
    if run.get("device", "auto") == "cpu" or run.get("gpu_busy", "fail") == "ignore":
        return []
    if run.get("device", "auto") == "auto" and handle(0, visible) is None:
        return []
    return list(range(int(run.get("world_size", 1))))


def wait_until_free(
    run: dict,
    visible: str | None = None,
    poll_s: float = 5.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """The device-busy guard before a CUDA cell: None when the cell's devices hold no other process (or
    run.gpu_busy=ignore, or no NVML), else the reason not to start. gpu_busy=fail answers at once;
    gpu_busy=wait polls every poll_s seconds for at most run.timeout_s. `visible`: the CUDA_VISIBLE_DEVICES the
    cell's child will get, when it is not this process's."""
    devices = cell_devices(run, visible)
    deadline, said = clock() + float(run.get("timeout_s", 0)), False
    while True:
        # compute processes only: a display server's graphics context neither times nor fills the GPU much
        busy = {i: [p for p in busy_processes(handle(i, visible)) or [] if p["kind"] == "compute"] for i in devices}
        busy = {i: ps for i, ps in busy.items() if ps}
        if not busy:
            return None
        what = "; ".join(f"cuda:{i} held by pid " + ",".join(str(p["pid"]) for p in ps) for i, ps in busy.items())
        if run.get("gpu_busy", "fail") == "fail":
            return f"device busy: {what} (run.gpu_busy=wait waits for it, run.gpu_busy=ignore runs anyway)"
        if clock() >= deadline:
            return f"device busy: {what}; still busy after run.timeout_s={run.get('timeout_s')} of run.gpu_busy=wait"
        if not said:
            log(f"membench: waiting for a free device ({what})")
            said = True
        time.sleep(poll_s)
