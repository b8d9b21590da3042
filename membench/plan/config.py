"""`plan.*` overrides: PlanConfig, typed and checked, and the split from the Hydra overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from membench import technique
from membench.errors import ConfigError


@dataclass
class PlanConfig:
    allow_approximate: bool = True  # false keeps exact techniques only (checkpointing, ZeRO)
    techniques: list[str] = field(default_factory=lambda: list(technique.families()))  # families to combine
    simulate: int = 8  # distinct fake-tensor simulations, spent on the best-ranked candidates
    max_layers: int = 4  # above this many blocks, simulate 2 layer counts and extrapolate per layer
    top: int = 20  # rows printed
    verify: int = 0  # run the top K fitting plans for real and compare
    out: str = ""  # JSON path; default RESULTS_DIR/plan-PRESET.json
    records: list[str] = field(default_factory=lambda: ["results"])  # roots searched for calibration records
    fit_max_runs: int = 8  # membench fit: real runs in the batch search

    def __post_init__(self) -> None:
        fams = technique.families()
        bad = sorted(set(self.techniques) - set(fams))
        if bad:
            raise ConfigError(f"plan.techniques={bad[0]}: unknown family; allowed: {', '.join(fams)}")
        for k in ("simulate", "top", "verify", "fit_max_runs", "max_layers"):
            if getattr(self, k) < 0:
                raise ConfigError(f"plan.{k}={getattr(self, k)}: must be >= 0")


def split_overrides(overrides: list[str]) -> tuple[PlanConfig, list[str]]:
    """`plan.*` overrides -> PlanConfig (typed); the rest go to Hydra."""
    mine = [o for o in overrides if o.startswith("plan.")]
    rest = [o for o in overrides if not o.startswith("plan.")]
    try:
        node = OmegaConf.merge(OmegaConf.structured(PlanConfig), OmegaConf.from_dotlist(mine).get("plan", {}))
    except OmegaConfBaseException as e:
        raise ConfigError(f"plan.{e.full_key}: {str(e).strip().splitlines()[0]}; allowed: "
                          f"{', '.join(f.name for f in dataclasses.fields(PlanConfig))}") from None  # fmt: skip
    return PlanConfig(**OmegaConf.to_container(node)), rest
