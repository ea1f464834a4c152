"""Settings of the training monitor (the `monitoring` section of a job). Unknown keys are rejected."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MonitorConfig", "PEAK_FLOPS"]

# Dense peak FLOP/s per device for the usual training dtypes (vendor datasheets, no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "h100-sxm-bf16": 989e12,
    "h100-pcie-bf16": 756e12,
    "h200-bf16": 989e12,
    "a100-bf16": 312e12,
    "a100-fp32": 19.5e12,
    "v100-fp16": 125e12,
    "mi300x-bf16": 1307e12,
}


class MonitorConfig(BaseModel):
    """What the monitor writes and how often. The trainer decides which steps are logged (its log interval);
    steps are optimizer steps, one step axis for all tags."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)  # no coercion

    enabled: bool = Field(True, description="Write expert-load monitoring and the trainer's scalars to TensorBoard.")
    histogram_every: int = Field(
        10, ge=1, description="Per-layer histograms of expert shares at the first logged step at or after every N steps."
    )
    heatmap_every: int = Field(
        50, ge=1, description="Layer x expert heatmap images (and expert_load.jsonl rows) at the first logged step "
        "at or after every N steps."
    )
    per_expert_max: int = Field(
        32,
        ge=0,
        description="Sub-layers with at most this many experts get one share scalar per expert; larger ones "
        "get only the top/bottom `top_k` shares (ranked, with expert ids), so tag counts stay bounded.",
    )
    top_k: int = Field(4, ge=1, description="How many of the most and least loaded experts to log beyond per_expert_max.")
    peak_flops: Optional[float] = Field(
        None, gt=0, description="Peak FLOP/s of one device for MFU; None (and no peak_flops_name) = no MFU."
    )
    peak_flops_name: Optional[str] = Field(
        None, description=f"Alternative to peak_flops: a key of molm_ds.monitor.PEAK_FLOPS ({', '.join(PEAK_FLOPS)})."
    )

    router_warmup_steps: int = Field(
        100, ge=0, description="Optimizer steps before the router checks start: from then on each logged step "
        "writes moe/L../../router_near_uniform and may warn (routers start near uniform and need some steps)."
    )
    router_uniform_tol: float = Field(
        0.02, gt=0, lt=1, description="A router is flagged near uniform when H(m|x) >= (1 - tol) log E over the "
        "logging window (docs/router_learning.md)."
    )
    router_dead_units_warn: float = Field(
        0.5, ge=0, le=1, description="Warn (once per sub-layer, after the warm-up) when at least this fraction of a "
        "router's hidden GELU units was never positive in a logging window."
    )

    @field_validator("peak_flops_name")
    @classmethod
    def _known_device(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in PEAK_FLOPS:
            raise ValueError(f"unknown peak_flops_name {v!r}; valid names: {', '.join(PEAK_FLOPS)} (or set peak_flops)")
        return v

    def resolved_peak_flops(self) -> Optional[float]:
        """Peak FLOP/s of one device, or None when MFU is not wanted."""
        if self.peak_flops is not None:
            return self.peak_flops
        return PEAK_FLOPS[self.peak_flops_name] if self.peak_flops_name else None
