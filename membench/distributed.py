"""Multi-rank runs: launch N ranks as one process group, set up torch.distributed, count collective traffic,
gather per-rank measurements onto rank 0.

Launcher: our own small one rather than torchrun, because torchrun starts every worker in a session of its own,
so the runner's killpg on timeout would not reach them. Here the ranks stay in the runner's new process group
(a timeout kills them all) and the first rank to exit non-zero takes the others down (torchrun's
--max-restarts 0 semantics). The env contract is torchrun's (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so
`torchrun --nproc_per_node N -m membench.child spec.json` runs the same code.
Communication counting is ours too (torch has no per-byte counter): a TorchDispatchMode that sees every c10d op,
including DDP's C++ reducer, FSDP2 and DeepSpeed (deepspeed.comm calls torch.distributed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def run_ranks(n: int, argv: list[str]) -> int:
    """Start n ranks of `argv` (children stay in our process group, so the runner's killpg on timeout reaches
    them); return the first non-zero exit code, killing the other ranks at once (they would otherwise wait in a
    collective until the gloo timeout), or 0 when all succeed."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(n))
    procs = [
        subprocess.Popen(argv, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n))) for r in range(n)
    ]
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                return bad[0] if bad[0] > 0 else 128 - bad[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


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
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
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


MiB = 2**20
_STATE_KEYS = ("params", "grads", "optimizer", "fp32_master")


def zero_table(records: list[dict]) -> str:
    """Markdown table of zero runs (latest per cell): per-rank model states measured (max over ranks) by category
    vs the ZeRO paper's per-rank formula, DeepSpeed's estimator, peak, step time and communication per step."""
    head = (
        "| backend | stage | N | status | params MiB | grads MiB | optim MiB | fp32 master MiB | states MiB "
        "| paper pred MiB | meas/pred | DS estimator MiB | vs stage 0 | peak MiB | unsharded params MiB "
        "| step ms | comm (paper units) / Psi | paper | final loss |\n|" + "---|" * 19
    )
    rows, base = [head], {}
    zs = [r for r in records if "zero" in (r.get("techniques") or [])]
    key = lambda r: (r["config"]["technique"]["zero"]["backend"], r["config"]["run"]["world_size"])  # noqa: E731
    for r in zs:
        if r["status"] == "ok" and r["config"]["technique"]["zero"]["stage"] == 0:
            base[key(r)] = sum(r["memory"]["model_states"].get(k, 0) for k in _STATE_KEYS)
    for r in sorted(zs, key=lambda r: (*key(r), r["config"]["technique"]["zero"]["stage"])):
        z, n = r["config"]["technique"]["zero"], r["config"]["run"]["world_size"]
        if r["status"] != "ok":
            rows.append(f"| {z['backend']} | {z['stage']} | {n} | {r['status']} |" + " - |" * 15)
            continue
        m, info = r["memory"], r.get("technique_info") or {}
        st = m["model_states"]
        total = sum(st.get(k, 0) for k in _STATE_KEYS)
        pred = sum(m["predicted_by_category"][k] for k in ("params", "grads", "optimizer"))
        est = info.get("zero.deepspeed_estimator")
        comm = (r.get("distributed") or {}).get("communication") or {}
        psi = info.get("zero.psi") or 1
        b = base.get(key(r))
        cells = [
            z["backend"],
            str(z["stage"]),
            str(n),
            "ok",
            *(f"{st.get(k, 0) / MiB:.2f}" for k in _STATE_KEYS),
            f"{total / MiB:.2f}",
            f"{pred / MiB:.2f}",
            f"{total / pred:.2f}",
            f"{est['device_bytes'] / MiB:.2f}" if est else "-",
            f"{b / total:.2f}x" if b else "-",
            f"{m['peak_bytes'] / MiB:.1f}",
            f"{m['by_category'].get('params_unsharded', 0) / MiB:.2f}",
            f"{r['timing']['median_step_s'] * 1e3:.0f}",
            f"{comm['paper_elements'] / psi:.2f}" if comm else "-",
            f"{comm['expected']['factor_of_psi']}" if comm.get("expected") else "-",
            f"{r['quality']['loss_curve'][-1]:.4f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    # python -m membench.distributed N python -m membench.child SPEC.json   (the launcher)
    # python -m membench.distributed report RESULTS_DIR                      (the ZeRO table)
    if sys.argv[1] == "report":
        from membench.records import latest_by_cell, load_records

        print(zero_table(list(latest_by_cell(load_records(sys.argv[2])).values())))
        sys.exit(0)
    sys.exit(run_ranks(int(sys.argv[1]), sys.argv[2:]))
