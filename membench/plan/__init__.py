"""`membench plan` and `membench fit`: which technique combination makes a workload fit a memory budget.

Enumerates checkpointing x precision x ZeRO stage/offload x 8-bit optimizer x quantized base, rejects invalid
combinations with the same validate()/check() rules as `run`, and predicts each one three ways, labelled:
`analytic` (model states by bytes-per-parameter rules + the workload's activation model), `simulation` /
`hybrid` (a fake-tensor step under MemTracker, per phase, membench/simulate.py; hybrid puts the model states of
techniques that cannot be simulated in place of the simulated ones, phase by phase) and `calibrated` (analytic
scaled by records of the same hardware, membench/calibrate.py). The best available one decides `fits`; a workload
without an analytic activation model (hf, custom) has no analytic peak and the simulation decides. `plan` takes
what `run` takes: `technique=[...]` (with its `technique.X.Y=` knobs) is in every candidate, `plan.techniques`
names the families searched on top of it. No library ranks the whole space (accelerate and DeepSpeed's
estimators cover model states of one configuration), so the search is ours.

Modules, in the order of the search: config (PlanConfig, split_overrides), enumeration (candidates, composition,
validation), predictors (analytic, simulated/hybrid, calibrated; time, quality, max batch), rank (finish, rank_key,
plan), verification (verify, predict_one, fit: real runs), tables (the printed tables and the JSON file). This
package re-exports their public names (`from membench import plan as pl; pl.plan(...)`); its modules import each
other, never the package itself.
"""

from membench.plan.config import PlanConfig, split_overrides
from membench.plan.enumeration import candidates, compose_cells, fast_cells, shared_cells, validated, without_list
from membench.plan.predictors import (
    HALF_SPEED,
    analytic,
    device_type_of,
    device_type_of_cfg,
    fake_workload,
    max_batch,
    quality,
    sim_device,
    sim_key,
    simulated,
    time_ratio,
)
from membench.plan.rank import PREDICTORS, finish, plan, rank_key
from membench.plan.tables import study_table, table, verify_table, write_json
from membench.plan.verification import fit, predict_one, verify

__all__ = [
    "HALF_SPEED",
    "PREDICTORS",
    "PlanConfig",
    "analytic",
    "candidates",
    "compose_cells",
    "device_type_of",
    "device_type_of_cfg",
    "fake_workload",
    "fast_cells",
    "finish",
    "fit",
    "max_batch",
    "plan",
    "predict_one",
    "quality",
    "rank_key",
    "sim_device",
    "shared_cells",
    "sim_key",
    "simulated",
    "split_overrides",
    "study_table",
    "table",
    "time_ratio",
    "validated",
    "verify",
    "verify_table",
    "without_list",
    "write_json",
]
