"""Where DeepSpeed ZeRO stage 3's step time goes at N=1: stage 1 vs stage 3 (paper and deepspeed knobs) on CPU.

    python scripts/profile_zero3.py --workload gpt_tiny
    python scripts/profile_zero3.py --workload gpt_tiny --set workload.n_layer=8 --steps 6 --json /tmp/p.json

One process builds every mode's run exactly as the harness does (the Hydra config from membench.cells.plan_cells,
techniques/zero.py's DeepSpeed engine, the training step of membench.execute.Trainer; none of zero.py's config
code is repeated here): fp32, one rank over gloo, one thread. The modes' steps are interleaved (one step of each in
turn) so that the shared machine's changing load hits them alike. DeepSpeed's stage 3 replaces
torch.nn.functional.linear process-wide (zero3_linear_wrap, a Python autograd Function); each mode steps with the
F.linear its own engine left in place, as it would in a run of its own. Passes, --steps rounds each:

1. plain: wall time of Trainer.step, nothing attached (what the harness times).
2. attributed: wall-clock timers around DeepSpeed's stage-1/3 internals (TARGETS: the
   PartitionedParameterCoordinator's fetch/release, the hooks DeepSpeed registers on every submodule, the
   per-parameter all_gather_coalesced/partition closures, gradient reduce/partition, the optimizer step over the
   flat partitions, deepspeed.comm's collectives), torch's AdamW.step, the model's forward, autograd's backward,
   and the step's phases. Times are exclusive (a timer's timed children are subtracted), so the components add up
   to the step; `torch+rest (phase)` is what no timer covers. A wrapped call costs ~1-3 us, counted in its caller.
3. profiled: torch.profiler with every timer also a record_function range: aten self time (the C++ arithmetic,
   copies, views) inside each component; a component's wall time less its aten time is Python.
4. one step per mode under membench.distributed.CommCounter: c10d collectives per step.

Output: a table per component group (ms/step, calls/step, [aten ms/step]) with the stage-3 excess over stage 1,
then the per-function detail. --cprofile MODE adds cProfile's top functions over --steps more steps of MODE.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # membench, techniques and workloads of the checkout this script lives in
MODES = {
    "stage1": ["technique.zero.stage=1"],
    "stage3_paper": ["technique.zero.stage=3", "technique.zero.stage3_knobs=paper"],
    "stage3_deepspeed": ["technique.zero.stage=3", "technique.zero.stage3_knobs=deepspeed"],
}
# (module, class, attributes, group): DeepSpeed 0.19 internals to time. Absent attributes are skipped.
COORD = "deepspeed.runtime.zero.partitioned_param_coordinator"
S3 = "deepspeed.runtime.zero.stage3"
S12 = "deepspeed.runtime.zero.stage_1_and_2"
TARGETS = [
    (COORD, "PartitionedParameterCoordinator", ["trace_prologue", "record_module", "reset_step"], "s3 trace"),
    (COORD, "PartitionedParameterCoordinator", ["fetch_sub_module", "_PartitionedParameterCoordinator__all_gather_params"], "s3 fetch"),
    (COORD, "PartitionedParameterCoordinator", ["release_sub_module", "release_and_reset_all", "_PartitionedParameterCoordinator__release_param", "_PartitionedParameterCoordinator__params_to_release"], "s3 release"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload", ["pre_sub_module_forward_function", "post_sub_module_forward_function", "pre_sub_module_backward_function", "post_sub_module_backward_function"], "s3 hooks"),
    ("deepspeed.runtime.zero.partition_parameters", "Init", ["_all_gather", "_allgather_param", "_allgather_params_coalesced"], "s3 all-gather"),
    ("deepspeed.runtime.zero.partition_parameters", "Init", ["_partition", "_partition_param"], "s3 release"),
    (S3, "DeepSpeedZeroOptimizer_Stage3", ["reduce_ready_partitions_and_remove_grads", "reduce_independent_p_g_buckets_and_remove_grads", "_DeepSpeedZeroOptimizer_Stage3__add_grad_to_ipg_bucket", "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads", "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads", "partition_grads", "independent_gradient_partition_epilogue", "overlapping_partition_gradients_reduce_epilogue", "backward_prologue", "backward_epilogue"], "grad reduce/partition"),
    (S3, "DeepSpeedZeroOptimizer_Stage3", ["step", "_pre_step", "_post_step", "_prepare_sub_group", "_release_sub_group", "_optimizer_step", "unscale_and_clip_grads", "_get_norm_groups", "get_grad_norm_direct", "_overflow_check_and_loss_scale_update", "_reassign_or_swap_out_partitioned_parameters", "_unflatten_partitioned_parameters", "_partition_all_parameters", "invalidate_secondary_tensor", "zero_grad"], "ds optimizer step"),
    (S12, "DeepSpeedZeroOptimizer", ["reduce_gradients", "reduce_ready_partitions_and_remove_grads", "reduce_independent_p_g_buckets_and_remove_grads", "reduce_ipg_grads", "average_tensor", "allreduce_bucket", "allreduce_and_copy", "buffered_reduce_fallback", "copy_grads_in_partition", "independent_gradient_partition_epilogue", "overlapping_partition_gradients_reduce_epilogue", "backward_epilogue"], "grad reduce/partition"),
    (S12, "DeepSpeedZeroOptimizer", ["step", "_optimizer_step", "scaled_global_norm", "get_grad_norm_direct", "unscale_and_clip_grads", "update_lp_params", "get_flat_partition", "free_grad_in_param_list", "check_overflow", "zero_grad"], "ds optimizer step"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", ["forward", "_take_model_step", "allreduce_gradients", "_backward_prologue", "_backward_epilogue", "zero_grad"], "engine"),
    ("deepspeed.comm.torch", "TorchBackend", ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced", "reduce_scatter_tensor", "reduce_scatter", "broadcast", "barrier", "all_reduce_coalesced"], "collectives"),
    ("deepspeed.accelerator.cpu_accelerator", "CPU_Accelerator", ["synchronize"], "sync"),
]  # fmt: skip
PHASES = ("forward", "backward", "opt step", "zero_grad+rest")


class Timers:
    """Exclusive wall time and call counts per label, kept per mode (`use(mode)` switches the books, so the
    class-level wrappers shared by every engine count for the engine that runs); a label's time excludes its
    timed children. With `ranges` on, each timed call is also a torch.profiler record_function range."""

    def __init__(self) -> None:
        self.stack: list[list] = []
        self.books: dict[str, tuple[dict, dict]] = {}
        self.group: dict[str, str] = {}
        self.ranges = False
        self.use("")

    def use(self, mode: str) -> None:
        self.mode = mode
        self.excl, self.calls = self.books.setdefault(mode, (defaultdict(float), defaultdict(int)))

    def begin(self, label: str) -> None:
        rf = None
        if self.ranges:
            rf = torch.profiler.record_function(f"@{self.mode}|{label}")
            rf.__enter__()
        self.stack.append([label, time.perf_counter(), 0.0, rf])

    def end(self) -> None:
        label, t0, child, rf = self.stack.pop()
        if rf is not None:
            rf.__exit__(None, None, None)
        dt = time.perf_counter() - t0
        self.excl[label] += dt - child
        self.calls[label] += 1
        if self.stack:
            self.stack[-1][2] += dt

    def wrap(self, fn, label: str, group: str):
        self.group[label] = group

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.begin(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end()

        return timed

    def reset(self) -> None:
        for excl, calls in self.books.values():
            excl.clear()
            calls.clear()

    def step(self, mode: str, tr, i: int) -> float:
        """One Trainer.step on these books, its phases timed too; returns its wall seconds."""
        self.use(mode)
        phase = iter(PHASES)

        def next_phase():
            self.end()
            self.begin(next(phase))

        t0 = time.perf_counter()
        self.begin(next(phase))
        tr.step(i, after_forward=next_phase, after_backward=next_phase, before_zero=next_phase)
        self.end()
        return time.perf_counter() - t0


def install_classes(timers: Timers) -> None:
    """Wrap the DeepSpeed internals in TARGETS (class attributes, looked up at call time) and autograd's
    backward; once per process."""
    import importlib

    for mod, cls, attrs, group in TARGETS:
        owner = getattr(importlib.import_module(mod), cls)
        for a in attrs:
            if a in vars(owner) and inspect.isfunction(vars(owner)[a]):
                short = a.split("__")[-1] if a.startswith("_") and "__" in a else a
                setattr(owner, a, timers.wrap(vars(owner)[a], f"{cls}.{short}", group))
    torch.Tensor.backward = timers.wrap(torch.Tensor.backward, "Tensor.backward (autograd)", "torch compute")
    torch.optim.AdamW.step = timers.wrap(torch.optim.AdamW.step, "AdamW.step (torch)", "torch compute")


def install_engine(timers: Timers, engine) -> None:
    """Wrap what one engine holds: the hook closures DeepSpeed registered on every submodule, the per-parameter
    all_gather_coalesced/partition closures stage 3 attaches, and the model's own forward (torch compute;
    the hooks inside it are subtracted)."""
    for m in engine.module.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for k, fn in list(hooks.items()):
                hooks[k] = timers.wrap(fn, f"hook {fn.__name__}", "s3 hooks")
    for p in engine.module.parameters():
        for a, group in (("all_gather_coalesced", "s3 all-gather"), ("partition", "s3 release")):
            if hasattr(p, a):
                setattr(p, a, timers.wrap(getattr(p, a), f"param.{a}", group))
    engine.module.forward = timers.wrap(engine.module.forward, "model.forward", "torch compute")


def profile_modes(timers: Timers, trainers: dict, i: int, rounds: int) -> dict[str, dict]:
    """torch.profiler over `rounds` more interleaved steps, every timer a record_function range: the self CPU
    time of the C++ ops (aten::*: arithmetic, copies, views) per step and mode, in all and per timer label (an op
    counts for its innermost enclosing timer). A label's wall time less its aten time is Python."""
    from torch.profiler import ProfilerActivity, profile

    timers.ranges = True
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(rounds):
            for m, tr in trainers.items():
                timers.step(m, tr, i + k)
    timers.ranges = False
    out = {m: {"aten_self_ms": 0.0, "aten_calls": 0.0, "by_label_ms": defaultdict(float)} for m in trainers}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        up = e.cpu_parent
        while up is not None and not up.name.startswith("@"):
            up = up.cpu_parent
        if up is None:
            continue
        mode, label = up.name[1:].split("|", 1)
        out[mode]["by_label_ms"][label] += e.self_cpu_time_total / 1e3 / rounds
        out[mode]["aten_self_ms"] += e.self_cpu_time_total / 1e3 / rounds
        out[mode]["aten_calls"] += 1 / rounds
    return out


LINEAR = torch.nn.functional.linear


class Stepper:
    """A Trainer whose step first puts back the torch.nn.functional.linear its engine runs with."""

    def __init__(self, tr, linear) -> None:
        self.tr, self.linear = tr, linear

    def step(self, i: int, **hooks) -> float:
        torch.nn.functional.linear = self.linear
        return self.tr.step(i, **hooks)


def measure(modes: list[str], workload: str, sets: list[str], steps: int, warmup: int, cprof: str) -> dict:
    """Every mode's Trainer in one process (one gloo group of one rank), their steps interleaved: a change in
    the machine's load hits all modes alike."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's all_gather_into_tensor deprecation
    torch.set_num_threads(1)
    from membench import distributed
    from membench.cells import plan_cells
    from membench.execute import Trainer, build_all

    base = [f"workload={workload}", "technique=[zero]", "run.device=cpu", "run.num_threads=1", *sets]
    cfgs = {m: plan_cells([*base, *MODES[m]], False)[0][0] for m in modes}
    out: dict = {"overrides": base, "load": [os.getloadavg()[0]], "modes": {m: {} for m in modes}}
    res = out["modes"]
    run, _, _, device = build_all(cfgs[modes[0]])
    # DeepSpeed's stage 3 replaces torch.nn.functional.linear process-wide with its own autograd Function
    # (zero3_linear_wrap, never put back): each mode steps with the F.linear its own engine left in place.
    linear = {}
    with distributed.process_group(device, run.timeout_s, True):
        trainers = {}
        for m in modes:
            torch.nn.functional.linear = LINEAR
            run, wcfg, techs, device = build_all(cfgs[m])
            trainers[m] = tr = Trainer(run, wcfg, techs, distributed.rank_device(device))
            linear[m] = torch.nn.functional.linear
            res[m]["f_linear"] = f"{linear[m].__module__}.{linear[m].__name__}"
            ps = list(tr.model.module.parameters())
            mods = list(tr.model.module.modules())
            res[m]["model"] = {
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in ps),
                "param_tensors": len(ps),
                "modules": len(mods),
                "modules_with_params": sum(1 for x in mods if next(x.parameters(recurse=False), None) is not None),
            }
        trainers = {m: Stepper(tr, linear[m]) for m, tr in trainers.items()}
        for i in range(warmup):
            for tr in trainers.values():
                tr.step(i)
        i = warmup
        plain: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(steps):
            for m, tr in trainers.items():
                t0 = time.perf_counter()
                tr.step(i)
                plain[m].append(1e3 * (time.perf_counter() - t0))
            i += 1
        out["load"].append(os.getloadavg()[0])
        timers = Timers()
        install_classes(timers)
        for tr in trainers.values():
            install_engine(timers, tr.tr.model)
            if tr.linear is not LINEAR:  # stage 3's F.linear: its forward side (autograd Function.apply)
                tr.linear = timers.wrap(tr.linear, "zero3_linear_wrap (F.linear)", "s3 linear")
            timers.step("", tr, i)  # a step with the timers in place before counting
        i += 1
        timers.reset()
        attributed: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(steps):
            for m, tr in trainers.items():
                attributed[m].append(1e3 * timers.step(m, tr, i))
            i += 1
        out["load"].append(os.getloadavg()[0])
        for m in modes:
            excl, calls = timers.books[m]
            res[m]["components"] = {
                k: {"group": timers.group.get(k, "torch+rest"), "ms": 1e3 * v / steps, "calls": calls[k] / steps}
                for k, v in excl.items()
            }
            res[m]["plain_ms"], res[m]["attributed_ms"] = plain[m], attributed[m]
        for m, a in profile_modes(timers, trainers, i, steps).items():
            res[m]["aten"] = a
        i += steps
        if cprof:  # extra steps of one mode (timers still in place, their books no longer read)
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(steps):
                trainers[cprof].step(i)
                i += 1
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            res[cprof]["cprofile_top"] = text.getvalue()
        for m, tr in trainers.items():
            counter = distributed.CommCounter()
            with counter:
                tr.step(i)
            res[m]["collectives_per_step"] = counter.summary()["by_op"]
            res[m]["losses"] = tr.tr.losses[-3:]
        out["load"].append(os.getloadavg()[0])
    return out


def groups(res: dict) -> dict[str, list[float]]:
    """label -> group totals: [ms/step (timed pass), calls/step, aten self ms/step (profiled pass)]."""
    g: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    name = {k: f"torch+rest ({k})" if c["group"] == "torch+rest" else c["group"] for k, c in res["components"].items()}
    for k, c in res["components"].items():
        g[name[k]][0] += c["ms"]
        g[name[k]][1] += c["calls"]
    for k, ms in res["aten"]["by_label_ms"].items():
        g[name.get(k, k)][2] += ms
    return dict(g)


MACHINERY = ("s3 hooks", "s3 fetch", "s3 release", "s3 trace", "s3 all-gather")


def report(out: dict) -> str:
    res = out["modes"]
    lines = [
        f"overrides {' '.join(out['overrides'])}; 1-min load average {' -> '.join(f'{x:.1f}' for x in out['load'])}"
    ]
    for m, r in res.items():
        md = r["model"]
        lines.append(
            f"{m}: plain median {statistics.median(r['plain_ms']):.1f} ms (min {min(r['plain_ms']):.1f}), attributed "
            f"median {statistics.median(r['attributed_ms']):.1f} ms; {md['params']} params in {md['param_tensors']} "
            f"tensors, {md['modules']} modules ({md['modules_with_params']} with own params); collectives/step "
            f"{json.dumps({k: v['calls'] for k, v in r['collectives_per_step'].items()})}; aten self "
            f"{r['aten']['aten_self_ms']:.1f} ms/step in {r['aten']['aten_calls']:g} ops; last losses "
            f"{', '.join(f'{x:.4f}' for x in r['losses'])}; F.linear {r['f_linear']}"
        )
    by = {m: groups(r) for m, r in res.items()}
    keys = sorted({k for g in by.values() for k in g}, key=lambda k: (k.startswith("torch+rest"), k))
    head = "| component | " + " | ".join(f"{m} ms (calls) [aten ms]" for m in by) + " |"
    if "stage1" in by:
        head += "".join(f" {m} - stage1 ms [aten] |" for m in by if m != "stage1")
    lines += ["", head, "|---" * (head.count("|") - 1) + "|"]
    for k in [*keys, "stage-3 machinery (s3 *)", "total"]:
        row, vals = f"| {k} |", {}
        for m, g in by.items():
            pick = g if k == "total" else {n: g[n] for n in MACHINERY if n in g} if k.startswith("stage-3") else None
            if pick is not None:
                vals[m] = [sum(v[j] for v in pick.values()) for j in range(3)]
            else:
                vals[m] = g.get(k, [0.0, 0.0, 0.0])
            row += f" {vals[m][0]:.1f} ({vals[m][1]:g}) [{vals[m][2]:.1f}] |"
        if "stage1" in by:
            d = {m: [vals[m][j] - vals["stage1"][j] for j in (0, 2)] for m in by if m != "stage1"}
            row += "".join(f" {d[m][0]:+.1f} [{d[m][1]:+.1f}] |" for m in d)
        lines.append(row)
    lines.append("")
    for m, r in res.items():  # the per-function detail behind each group
        lines.append(f"{m} per function (ms/step, calls/step, exclusive; aten ms/step inside it):")
        for k, c in sorted(r["components"].items(), key=lambda kv: -kv[1]["ms"]):
            if c["ms"] >= 0.05:
                aten = r["aten"]["by_label_ms"].get(k, 0.0)
                lines.append(f"  {c['group']:22s} {k:62s} {c['ms']:8.2f} {c['calls']:7g} {aten:7.2f}")
        if "cprofile_top" in r:
            lines.append(r["cprofile_top"])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="gpt_tiny")
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override, e.g. workload.n_layer=8")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=8, help="rounds per pass (plain, attributed, profiled)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cprofile", default="", help="a mode to run cProfile over (--steps more steps)")
    ap.add_argument("--json", default="", help="write the raw results here")
    a = ap.parse_args()
    out = measure(a.modes.split(","), a.workload, a.set, a.steps, a.warmup, a.cprofile)
    print(report(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
