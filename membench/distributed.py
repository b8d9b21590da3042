"""Multi-rank runs: launch N ranks through torchrun, set up torch.distributed (gloo on CPU, NCCL on CUDA with one GPU
per rank: LOCAL_RANK -> cuda:LOCAL_RANK), count collective traffic, gather per-rank measurements onto rank 0.

Launcher: torch.distributed.run (torchrun's module, in this process, so this process is the elastic agent):
`--standalone --nproc-per-node N --max-restarts 0`, the first failing rank stops the group. torchrun starts each
worker in a session of its own, so the runner's killpg would miss them when the agent is SIGKILLed; each worker
therefore first sets PR_SET_PDEATHSIG(SIGKILL) (a two-line `python -c` shim that then execs the rank's command):
when the agent dies, however it dies, its ranks die with it. Multi-node: the same rank command under
`srun ... python -m torch.distributed.run --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT` (docs/multigpu.md).
Communication counting is ours (torch has no per-byte counter): a TorchDispatchMode that sees every c10d op,
including DDP's C++ reducer, FSDP2 and DeepSpeed (deepspeed.comm calls torch.distributed).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from membench import gpuinfo
from membench.cells import configs
from membench.child import die_with_parent
from membench.errors import ConfigError
from membench.records import config_hash, new_run_id

# What the ranks of a multi-node cell run: the worker `membench run` passes (membench.sweep.WORKER), as the spec
# names it. Named, not imported: membench.execute imports this module.
WORKER = "membench.execute:execute"
# How each collective's "full" tensor counts in the ZeRO paper's volume (sec. 7): an all-reduce is a
# reduce-scatter plus an all-gather (2x its size); the others move their full size once.
_PAPER_WEIGHT = {"allreduce": 2}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run in each worker before the rank's own command: die with the agent (prctl option 1 = PR_SET_PDEATHSIG,
# signal 9), and exit at once if the agent is already gone (the parent changed before prctl took effect).
_RANK_SHIM = (
    "import ctypes, os, sys; sys.platform != 'linux' or ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
    "os.getppid() == {agent} or sys.exit(137); os.execv(sys.argv[1], sys.argv[1:])"
)


def torchrun_args(n: int, argv: list[str], agent_pid: int | None = None) -> list[str]:
    """torchrun's command line for n ranks of `argv` on this node (one rendezvous on a free localhost port)."""
    shim = _RANK_SHIM.format(agent=agent_pid or os.getpid())
    return [
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={n}",
        "--max-restarts=0",
        "--monitor-interval=0.1",
        "--no-python",
        sys.executable,
        "-c",
        shim,
        *argv,
    ]


def run_ranks(n: int, argv: list[str]) -> int:
    """Run n ranks of `argv` under torch.distributed.run with this process as the agent; return 0 when all
    succeed, else the exit code of the first rank to fail (128 + signal for a killed rank); the agent stops the
    other ranks at once (they would otherwise wait in a collective until the timeout)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    try:
        torchrun(parse_args(torchrun_args(n, argv)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float, needed: bool):
    """Initialise torch.distributed from the env (a launched rank) or as a world of one (a zero run in a single
    process); tear down only what was set up here. gloo on CPU, NCCL on CUDA; collectives time out after
    timeout_s so a dead peer ends the run instead of hanging it."""
    if dist.is_initialized() or not (needed or "RANK" in os.environ):
        yield
        return
    saved = dict(os.environ)
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":  # one GPU per rank; binding it at init keeps every rank off cuda:0
        local, world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if world > torch.cuda.device_count():
            raise ConfigError(
                f"run.world_size={world}: needs one CUDA device per rank, {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def rank_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def _op_kind(name: str) -> str:
    for kind in ("allreduce", "reduce_scatter", "allgather", "broadcast", "all_to_all", "reduce", "scatter"):
        if kind in name.replace("_base", "").replace("all_gather", "allgather"):
            return kind
    return name


class CommCounter(TorchDispatchMode):
    """Counts calls, elements and bytes of every c10d collective run while active. Per call, the counted size is
    the largest argument (the full tensor: an all-gather's output, a reduce-scatter's input, an all-reduce's or a
    broadcast's buffer); `paper_elements` weights all-reduce by 2, as in the ZeRO paper's 2Psi for DP."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, dict[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            sizes = [sum(t.numel() for t in tree_leaves(a) if isinstance(t, torch.Tensor)) for a in args]
            nbytes = [
                sum(t.numel() * t.element_size() for t in tree_leaves(a) if isinstance(t, torch.Tensor)) for a in args
            ]
            if sizes and max(sizes) > 0:
                i = sizes.index(max(sizes))
                kind = _op_kind(func.__name__.split(".")[0])
                op = self.ops.setdefault(kind, {"calls": 0, "elements": 0, "bytes": 0})
                op["calls"] += 1
                op["elements"] += sizes[i]
                op["bytes"] += nbytes[i]
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        elements = sum(o["elements"] for o in self.ops.values())
        paper = sum(o["elements"] * _PAPER_WEIGHT.get(k, 1) for k, o in self.ops.items())
        return {
            "by_op": self.ops,
            "elements": elements,
            "bytes": sum(o["bytes"] for o in self.ops.values()),
            "paper_elements": paper,
        }


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_ranks(out: dict) -> dict:
    """Gather each rank's measured sections; rank 0's record keeps them under memory.per_rank and shows the max
    over ranks as the headline (each rank's own device peak; the split and by-device figures of the rank with the
    highest peak; model states by category) and the mean loss over ranks' shards. Ranks are separate processes
    with separate devices: their peaks are never added."""
    n = world_size()
    m = out["memory"]
    mine = {
        "rank": rank(),
        "host": socket.gethostname(),
        "torch_device": out["timing"]["device"],
        "gpu_nvml": gpuinfo.provenance(gpuinfo.handle(out["timing"]["device"])),
        **{k: m[k] for k in ("peak_bytes", "by_category", "by_device", "held_after_forward", "model_states")},
        "model_states_by_device": m["model_states_by_device"],
        "device": m["device"],
        "communication": out["distributed"]["communication"],
        "median_step_s": out["timing"]["median_step_s"],
        "loss_curve": out["quality"]["loss_curve"],
    }
    ranks = gather(mine)
    top = max(ranks, key=lambda r: r["peak_bytes"])
    for k in ("peak_bytes", "by_category", "by_device", "held_after_forward", "model_states_by_device"):
        m[k] = top[k]
    m["model_states"] = {k: max(r["model_states"].get(k, 0) for r in ranks) for k in m["model_states"]}
    m["headline"] = f"max over {n} rank(s): peak and its split from the rank with the highest peak"
    m["per_rank"] = ranks
    out["quality"]["loss_curve"] = [sum(c) / n for c in zip(*(r["loss_curve"] for r in ranks), strict=True)]
    out["quality"]["loss_curve_note"] = "mean over ranks of each rank's loss on its own data shard"
    out["distributed"]["communication"] = max(ranks, key=lambda r: r["communication"]["bytes"])["communication"]
    return out


def write_spec(path: str, overrides: list[str]) -> dict:
    """Compose one cell and write the spec `membench.child` runs (the runner's format): for a multi-node cell
    started by srun + torchrun, where no membench runner is in the loop (docs/multigpu.md)."""
    (config,) = configs(overrides, multirun=False)
    chash = config_hash(config)
    spec = {
        "config": config,
        "run_id": new_run_id(chash),
        "config_hash": chash,
        "worker": WORKER,
        "results_dir": config["run"]["results_dir"],
    }
    with open(path, "w") as f:
        json.dump(spec, f)
    return spec


def main(argv: list[str]) -> int:
    """python -m membench.distributed N python -m membench.child SPEC.json   (the launcher: N ranks, this node)
    python -m membench.distributed spec SPEC.json OVERRIDES...             (a cell's spec, for srun + torchrun)
    (the ZeRO table: python -m membench.studies zero_stages RESULTS_DIR)"""
    if argv[0] == "spec":
        try:
            write_spec(argv[1], argv[2:])
        except ConfigError as e:
            print(f"membench: error: {e}", file=sys.stderr)
            return 2
        return 0
    die_with_parent()  # the agent of a sweep's cell dies with the sweep, as a one-rank cell does (its ranks with it)
    return run_ranks(int(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
