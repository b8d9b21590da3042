"""One cell's training step as a callable, for timing in-process: the same Trainer membench/execute.py runs
(workload, techniques in their fixed order, optimizer, LR warm-up, step context, engine hooks)."""

from __future__ import annotations

import contextlib
import itertools

import torch

from membench import distributed
from membench.execute import Trainer, build_all


@contextlib.contextmanager
def training_step(config: dict):
    """Yields step(): one real optimizer step of the cell on the next batch; returns the loss."""
    run, wcfg, techs, device = build_all(config)
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    with distributed.process_group(device, run.timeout_s, any(t.kind == "zero" for t in techs)):
        tr = Trainer(run, wcfg, techs, distributed.rank_device(device))
        counter = itertools.count()

        def step() -> float:
            loss = tr.step(next(counter))  # .item() inside synchronises the device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return loss

        yield step
