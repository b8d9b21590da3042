"""membench.gpuinfo against a stubbed NVML (pynvml's functions monkeypatched to a two-GPU fake machine), and
against this machine's real absence of NVML: exact bookkeeping, device mapping, the busy guard's policies."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pynvml
import pytest

from membench import gpuinfo


class FakeGPU:
    def __init__(self, index: int, uuid: str) -> None:
        self.index, self.uuid = index, uuid
        self.used, self.total, self.energy = 1000 + index, 80 * 2**30, 5_000_000 + index
        self.compute: list = []
        self.graphics: list = []


@pytest.fixture
def nvml(monkeypatch):
    """Two fake GPUs; the second one has no energy counter and no ECC (NVML answers NotSupported)."""
    gpus = [FakeGPU(0, "GPU-aaaa"), FakeGPU(1, "GPU-bbbb")]
    by_uuid = {g.uuid: g for g in gpus}

    def not_supported(*_):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def by_index(i):
        if i >= len(gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpus[i]

    def energy(h):
        return not_supported() if h.index == 1 else h.energy

    def ecc(h):
        return not_supported() if h.index == 1 else (1, 0)

    fns = {
        "nvmlInit": lambda: None,
        "nvmlDeviceGetHandleByIndex": by_index,
        "nvmlDeviceGetHandleByUUID": lambda u: by_uuid[u.decode() if isinstance(u, bytes) else u],
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=h.used, total=h.total, free=h.total - h.used),
        "nvmlDeviceGetTotalEnergyConsumption": energy,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: h.compute,
        "nvmlDeviceGetGraphicsRunningProcesses": lambda h: h.graphics,
        "nvmlSystemGetDriverVersion": lambda: "570.1",
        "nvmlDeviceGetName": lambda h: b"NVIDIA H200",
        "nvmlDeviceGetUUID": lambda h: h.uuid,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetClockInfo": lambda h, c: {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 3201}[c],
        "nvmlDeviceGetMaxClockInfo": lambda h, c: {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 3201}[c],
        "nvmlDeviceGetApplicationsClock": not_supported,
        "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
        "nvmlDeviceGetEccMode": ecc,
    }
    for name, fn in fns.items():
        monkeypatch.setattr(pynvml, name, fn)
    monkeypatch.setattr(gpuinfo, "_state", {})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return gpus


def _proc(pid: int, mem: int | None):
    return SimpleNamespace(pid=pid, usedGpuMemory=mem)


def test_without_nvml_everything_is_none(monkeypatch):
    def missing():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    monkeypatch.setattr(gpuinfo, "_state", {})
    h = gpuinfo.handle("cuda:0")
    assert h is None
    assert (gpuinfo.used_bytes(h), gpuinfo.energy_mj(h), gpuinfo.busy_processes(h), gpuinfo.provenance(h)) == (
        None,
        None,
        None,
        None,
    )
    assert gpuinfo.wait_until_free({"device": "auto", "world_size": 2, "gpu_busy": "fail"}) is None


def test_cpu_device_has_no_handle(nvml):
    assert gpuinfo.handle("cpu") is None
    assert gpuinfo.handle(None) is None


def test_ordinals_map_through_cuda_visible_devices(nvml, monkeypatch):
    assert gpuinfo.handle("cuda") is nvml[0]
    assert gpuinfo.handle("cuda:1") is nvml[1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the cell was given physical GPU 1: its cuda:0
    assert gpuinfo.handle("cuda:0") is nvml[1]
    assert gpuinfo.handle("cuda:1") is None  # not visible to the cell
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert [gpuinfo.handle(i) for i in (0, 1)] == [nvml[1], nvml[0]]


def test_used_bytes_and_energy_read_the_counters(nvml):
    h = gpuinfo.handle(0)
    assert gpuinfo.used_bytes(h) == 1000
    before = gpuinfo.energy_mj(h)
    nvml[0].energy += 123_456
    nvml[0].used = 7 * 2**30
    assert gpuinfo.energy_mj(h) - before == 123_456
    assert gpuinfo.used_bytes(h) == 7 * 2**30
    assert gpuinfo.energy_mj(gpuinfo.handle(1)) is None  # counter not supported: None, not an exception


def test_busy_processes_lists_others_once_and_not_this_process(nvml):
    g = nvml[0]
    g.compute = [_proc(os.getpid(), 500), _proc(4242, 2**30), _proc(77, None)]
    g.graphics = [_proc(4242, 2**30), _proc(900, 10)]  # a process in both lists counts once
    busy = gpuinfo.busy_processes(gpuinfo.handle(0))
    assert busy == [
        {"pid": 4242, "used_bytes": 2**30, "kind": "compute"},
        {"pid": 77, "used_bytes": None, "kind": "compute"},
        {"pid": 900, "used_bytes": 10, "kind": "graphics"},
    ]
    assert gpuinfo.busy_processes(gpuinfo.handle(0), exclude={4242, 77, 900}) == []


def test_provenance_fields_and_unsupported_ones(nvml):
    p = gpuinfo.provenance(gpuinfo.handle(0))
    assert p["name"] == "NVIDIA H200" and p["uuid"] == "GPU-aaaa" and p["driver"] == "570.1"
    assert p["compute_capability"] == "9.0" and p["memory_total_bytes"] == 80 * 2**30
    assert p["clocks_mhz"] == {
        "sm": 1980,
        "mem": 3201,
        "sm_max": 1980,
        "mem_max": 3201,
        "sm_app": None,
        "mem_app": None,
    }
    assert p["power_limit_w"] == 700.0
    assert p["ecc"] == {"current": True, "pending": False}
    assert gpuinfo.provenance(gpuinfo.handle(1))["ecc"] is None


RUN = {"device": "cuda", "world_size": 2, "timeout_s": 30.0}


def test_fail_policy_names_the_busy_device_and_pid(nvml):
    nvml[1].compute = [_proc(31337, 2**20)]
    msg = gpuinfo.wait_until_free({**RUN, "gpu_busy": "fail"})
    assert msg.startswith("device busy: cuda:1 held by pid 31337 ")
    assert gpuinfo.wait_until_free({**RUN, "world_size": 1, "gpu_busy": "fail"}) is None  # cuda:0 is free
    # a scheduler that gives the cell physical GPU 1 as its cuda:0 (the child's env, not ours)
    assert "cuda:0 held by pid 31337" in gpuinfo.wait_until_free({**RUN, "world_size": 1, "gpu_busy": "fail"}, "1")
    assert gpuinfo.wait_until_free({**RUN, "gpu_busy": "ignore"}) is None
    nvml[1].compute, nvml[1].graphics = [], [_proc(555, 2**20)]  # a display server only: not busy
    assert gpuinfo.wait_until_free({**RUN, "gpu_busy": "fail"}) is None
    assert gpuinfo.wait_until_free({**RUN, "device": "cpu", "gpu_busy": "fail"}) is None


def test_wait_policy_starts_when_the_device_frees_up(nvml, monkeypatch):
    nvml[0].compute = [_proc(31337, 2**20)]
    polls, logs = [], []

    def sleep(s):  # the other process leaves after the third poll
        polls.append(s)
        if len(polls) == 3:
            nvml[0].compute = []

    monkeypatch.setattr(gpuinfo.time, "sleep", sleep)
    assert gpuinfo.wait_until_free({**RUN, "gpu_busy": "wait"}, poll_s=2.0, log=logs.append, clock=lambda: 0.0) is None
    assert polls == [2.0, 2.0, 2.0]
    assert logs == ["membench: waiting for a free device (cuda:0 held by pid 31337)"]


def test_wait_policy_gives_up_after_the_timeout(nvml, monkeypatch):
    nvml[0].compute = [_proc(31337, 2**20)]
    now = [0.0]
    monkeypatch.setattr(gpuinfo.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    msg = gpuinfo.wait_until_free({**RUN, "gpu_busy": "wait"}, poll_s=7.0, log=lambda _: None, clock=lambda: now[0])
    assert "still busy after run.timeout_s=30.0" in msg
    assert now[0] == 35.0  # polls at 0, 7, ..., 35: the first reading past the 30 s deadline gives up


def test_real_machine_without_a_gpu_reads_none(monkeypatch):
    monkeypatch.setattr(gpuinfo, "_state", {})
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpuinfo.handle("cuda:0") is None and gpuinfo.provenance(None) is None


def test_runner_records_a_busy_device_and_starts_no_child(nvml, tmp_path, monkeypatch):
    from membench import runner

    config = {"workload": {"preset": "gpt_tiny"}, "run": {"device": "cuda", "gpu_busy": "fail", "world_size": 1}}
    nvml[0].compute = [_proc(31337, 2**20)]
    real = runner.subprocess.Popen

    def popen(argv, *a, **k):  # git for the record's provenance may run; the cell's child must not
        assert "membench.child" not in argv, "a child was started on a busy device"
        return real(argv, *a, **k)

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    rec = runner.run_cell(config, str(tmp_path), 60.0)
    assert rec["status"] == "error" and rec["error"].startswith("device busy: cuda:0 held by pid 31337")
    (path,) = (tmp_path / "runs").glob("*.json")
    assert json.loads(path.read_text())["error"] == rec["error"]


def test_record_env_carries_the_devices_nvml_provenance(nvml):
    from membench.records import environment

    assert environment("cuda:1")["gpu_nvml"]["uuid"] == "GPU-bbbb"
    assert "gpu_nvml" not in environment("cpu")
