"""Flashlab's torch-free core: the shared domain (model, hardware, policy, trace),
the policy engine that turns them into per-token plans, and the SimPy simulator that times
those plans. The real backend (``real/``) executes the very same plans."""

from sim.errors import ConfigError
from sim.model_spec import ModelSpec
from sim.hardware import HardwareProfile
from sim.policy import Policy
from sim.trace import Trace, SyntheticTraceConfig, generate_trace
from sim.layout import FlashLayout
from sim.plan import PolicyEngine, LayerPlan

__all__ = [
    "ConfigError", "ModelSpec", "HardwareProfile", "Policy", "Trace", "SyntheticTraceConfig",
    "generate_trace", "FlashLayout", "PolicyEngine", "LayerPlan",
]
