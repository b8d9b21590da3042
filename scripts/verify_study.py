"""The planner's verified study (issue 17, item 8): predict one technique combination per cell, run it, compare.

    PYTHONPATH=. nice -n 10 python scripts/verify_study.py [--only NAME,...] [--list]

Each cell is one `membench plan ... plan.techniques=[]` (exactly the given combination: one row) followed by
`verify` of that row (a real run in a child process, membench.plan.verification.verify), so each record in
results/plan_verified/runs/ carries the planner's `plan_check`: the prediction of every predictor, the measured
peak and the error. No cell here (preset, batch and combination) is one that a predictor's test compares with
a run or that an earlier study verified: the earlier verified study used gpt_tiny, gpt_small and
digits_cnn_tiny; the tests that compare the simulation with real runs use llama_tiny only with bf16_pure; the
presets themselves appear in the planner's tests (plans that answer, LoRA parameter counts), at other batch
sizes (the cells here take batch 6, 24 for custom, 2 for llama_small).

The budget is set from the planner's own prediction, so that the cell tests what it should: a first plan with
no real budget (1e9 MiB) gives the predicted peak P; "fit" cells then run at a budget of 1.25 x P (predicted to
fit; the run ends oom if the measured peak is more than 25% above the prediction), "nofit" cells at 0.9 x P
(predicted not to fit: the run must end oom, a budget overrun being recorded as oom; it ends ok if the
prediction is more than 10% too high). The cell is planned a second time at that budget, so the record's
`predicted_fits` is the planner's own answer at the budget the run had. The two factors were fixed before the
first run and nothing was tuned to a result. The list grew once, after the first pass: LoRA on transformers'
GPT-2 (the planner and `run` refuse it: GPT-2's Conv1D layers are not nn.Linear) was replaced by LoRA on its
Llama (`workload=hf`), in the fit and the nofit cell; Qwen2 was added; and DeepSpeed with small buckets was
added because its default buckets dwarf this model's bytes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from membench.plan import plan, split_overrides, verify

OUT = "results/plan_verified"
COMMON = [
    "run.train_steps=4",
    "run.warmup_steps=1",
    "run.measure_steps=1",
    "run.device=cpu",
    "run.timeout_s=600",
    f"run.results_dir={OUT}",
    "plan.techniques=[]",  # exactly the given combination
    "plan.records=[]",  # no calibration: the simulation and the state rules only
]
FIT, NOFIT = 1.25, 0.9  # budget / predicted peak


# name, kind (fit | nofit), overrides
def _zero(stage: int, backend: str, ranks: int, *extra: str) -> list[str]:
    """llama_tiny at batch 6 over `ranks` ranks with ZeRO `stage` on `backend`, plus `extra` knobs."""
    return ["workload=llama_tiny", "run.batch_size=6", f"run.world_size={ranks}", "technique=[zero]",
            f"technique.zero.stage={stage}", f"technique.zero.backend={backend}", *extra]  # fmt: skip


CELLS: list[tuple[str, str, list[str]]] = [
    # llama
    ("llama_tiny", "fit", ["workload=llama_tiny", "run.batch_size=6"]),
    (
        "llama_tiny-ckpt_full",
        "fit",
        [
            "workload=llama_tiny",
            "run.batch_size=6",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=full",
        ],
    ),
    (
        "llama_small-ckpt_sel",
        "fit",
        [
            "workload=llama_small",
            "run.batch_size=2",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=selective",
        ],
    ),
    # hf
    ("hf_gpt2_tiny", "fit", ["workload=hf_gpt2_tiny", "run.batch_size=6"]),
    (
        "hf_gpt2_tiny-ckpt_full",
        "fit",
        [
            "workload=hf_gpt2_tiny",
            "run.batch_size=6",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=full",
        ],
    ),
    ("hf_qwen2", "fit", ["workload=hf", "workload.model_type=qwen2", "run.batch_size=6"]),
    # custom
    ("custom", "fit", ["workload=custom", "run.batch_size=24"]),
    (
        "custom-ckpt_full",
        "fit",
        [
            "workload=custom",
            "run.batch_size=24",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=full",
        ],
    ),
    # LoRA, QLoRA
    ("llama_tiny-lora", "fit", ["workload=llama_tiny", "run.batch_size=6", "technique=[lora]"]),
    # (transformers' GPT-2 has Conv1D, not nn.Linear: `lora` refuses it, and the planner with it)
    ("hf_llama-lora", "fit", ["workload=hf", "run.batch_size=6", "technique=[lora]"]),
    ("llama_tiny-qlora", "fit", ["workload=llama_tiny", "run.batch_size=6", "technique=[quantized_base,lora]"]),
    # ZeRO at 2 ranks, both backends
    *[(f"llama_tiny-zero{st}-{be}-x2", "fit", _zero(st, be, 2)) for be in ("torch", "deepspeed") for st in (2, 3)],
    # DeepSpeed with its default buckets (5e8 elements) holds ~1.9 GB of buckets on this tiny model; with small
    # buckets the model states and activations are what the prediction is about
    *[
        (
            f"llama_tiny-zero{st}-deepspeed-bucket5e5-x2",
            "fit",
            _zero(
                st,
                "deepspeed",
                2,
                "technique.zero.reduce_bucket_size=500000",
                "technique.zero.allgather_bucket_size=500000",
            ),
        )  # fmt: skip
        for st in (2, 3)
    ],
    # the new techniques
    (
        "llama_tiny-v32k-fused_ce",
        "fit",
        ["workload=llama_tiny", "run.batch_size=6", "workload.vocab_size=32768", "technique=[fused_ce]"],
    ),
    (
        "llama_tiny-optimizer_in_backward",
        "fit",
        ["workload=llama_tiny", "run.batch_size=6", "technique=[optimizer_in_backward]"],
    ),
    (
        "llama_tiny-adafactor",
        "fit",
        [
            "workload=llama_tiny",
            "run.batch_size=6",
            "technique=[optimizer_lowmem]",
            "technique.optimizer_lowmem.algo=adafactor",
        ],
    ),
    (
        "llama_tiny-adam_mini",
        "fit",
        [
            "workload=llama_tiny",
            "run.batch_size=6",
            "technique=[optimizer_lowmem]",
            "technique.optimizer_lowmem.algo=adam_mini",
        ],
    ),
    ("llama_tiny-accum2", "fit", ["workload=llama_tiny", "run.batch_size=6", "run.grad_accum_steps=2"]),
    (
        "llama_tiny-activation_offload",
        "fit",
        ["workload=llama_tiny", "run.batch_size=6", "technique=[activation_offload]"],
    ),
    ("custom-optimizer_8bit", "fit", ["workload=custom", "run.batch_size=24", "technique=[optimizer_8bit]"]),
    # predicted not to fit: run anyway, must end oom
    ("nofit-llama_tiny", "nofit", ["workload=llama_tiny", "run.batch_size=6"]),
    ("nofit-hf_llama-lora", "nofit", ["workload=hf", "run.batch_size=6", "technique=[lora]"]),
    (
        "nofit-custom-ckpt_full",
        "nofit",
        [
            "workload=custom",
            "run.batch_size=24",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=full",
        ],
    ),
    (
        "nofit-llama_tiny-adafactor",
        "nofit",
        [
            "workload=llama_tiny",
            "run.batch_size=6",
            "technique=[optimizer_lowmem]",
            "technique.optimizer_lowmem.algo=adafactor",
        ],
    ),
    ("nofit-llama_tiny-zero2-torch-x2", "nofit", _zero(2, "torch", 2)),
    # ZeRO at 4 ranks (last: each takes tens of seconds)
    *[(f"llama_tiny-zero{st}-{be}-x4", "fit", _zero(st, be, 4)) for be in ("torch", "deepspeed") for st in (2, 3)],
]


def _plan(overrides: list[str], budget_mib: float) -> tuple[dict, list[str]]:
    pc, rest = split_overrides([*COMMON, *overrides, f"run.memory_budget_mib={budget_mib}"])
    return plan(rest, pc, progress=lambda *_: None), rest


def run_cell(name: str, kind: str, overrides: list[str]) -> dict:
    first, _ = _plan(overrides, 1e9)
    (row,) = first["rows"]
    peak = row["peak_bytes"] / 2**20
    budget = math.ceil(peak * (FIT if kind == "fit" else NOFIT) * 100) / 100  # MiB, 2 decimals
    result, rest = _plan(overrides, budget)
    (check,) = verify(result, rest, 1, progress=lambda *_: None, unfit=True)
    return check


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated cell names")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(",")))
    bad = only - {n for n, _, _ in CELLS}
    if bad:
        print(f"verify_study: --only {sorted(bad)[0]}: unknown cell; allowed: {', '.join(n for n, _, _ in CELLS)}")
        return 2
    if a.list:
        print("\n".join(f"{n} ({k}): {' '.join(o)}" for n, k, o in CELLS))
        return 0
    for name, kind, ov in CELLS:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            c = run_cell(name, kind, ov)
        except Exception as e:  # a cell the planner cannot plan is a result too: say it, go on
            print(f"{name}: planner error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            continue
        m = c["measured"]
        err = "n/a" if c["peak_error"] is None else f"{c['peak_error']:+.1%}"
        meas = "n/a" if m["peak_bytes"] is None else f"{m['peak_bytes'] / 2**20:.2f}"
        print(f"{name}: {c['predictor']} {c['predicted_peak_bytes'] / 2**20:.2f} MiB, measured {meas} MiB "
              f"({err}), budget {c['budget_mib']:g}, fits {c['predicted_fits']}, status {m['status']} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
