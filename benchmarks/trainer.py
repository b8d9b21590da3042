"""One cell's training step as a callable, for timing in-process.

membench/execute.py keeps its step as a closure inside `_execute` (with measurement hooks), so this module
rebuilds the same pieces in the same order (build_all, compose.ordered/apply_all, the patch's optimizer,
step context, backward and step hooks) and returns a plain step. If execute.py later exposes its step, this
file should call that instead.
"""

from __future__ import annotations

import contextlib

import torch

from membench import distributed
from membench.execute import build_all
from techniques import compose
from techniques.base import Context


@contextlib.contextmanager
def training_step(config: dict):
    """Yields step(): one real optimizer step of the cell on the next batch; returns the loss tensor."""
    run, wcfg, techs, device = build_all(config)
    torch.manual_seed(run.seed)
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    with distributed.process_group(device, run.timeout_s, any(t.kind == "zero" for t in techs)):
        wl = wcfg.build(run.seed)
        model = wl.model.to(device)
        techs = compose.ordered(techs)
        model, patch = compose.apply_all(techs, model, Context(workload=wl, device=device, run=run))
        wl.model = model
        make_opt = patch.optimizer_factory or (
            lambda m: wl.make_optimizer([p for p in m.parameters() if p.requires_grad])
        )
        optimizer = make_opt(model)
        model.train()
        state = {"i": 0}

        def step() -> torch.Tensor:
            batch = wl.batch(state["i"], run.batch_size, device)
            for g in optimizer.param_groups:  # the workload's LR warm-up, as execute.py applies it
                g["lr"] = g.setdefault("membench_base_lr", g["lr"]) * wl.lr_scale(state["i"])
            state["i"] += 1
            with patch.step_context():
                loss = wl.loss(model, batch)
            if patch.backward is not None:
                patch.backward(loss)
            elif patch.grad_scaler is not None:
                patch.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
            if patch.optimizer_step is not None:
                patch.optimizer_step()
            elif patch.grad_scaler is not None:
                patch.grad_scaler.step(optimizer)
                patch.grad_scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for hook in patch.after_step:
                hook()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return loss.detach()

        yield step
