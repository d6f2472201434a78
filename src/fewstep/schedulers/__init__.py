"""diffusers-compatible schedulers for fewstep's few-step generators."""
from .twinflow import TwinFlowScheduler, TwinFlowSchedulerOutput, default_gap_end, ucgm_sigmas

__all__ = ["TwinFlowScheduler", "TwinFlowSchedulerOutput", "default_gap_end", "ucgm_sigmas"]
