"""The race lab: deterministic cache/database interleavings (``cachesync lab``) and a stress test
(``cachesync lab stress``). See docs/lab.md."""

from .embedded import LabError, start_server
from .scenarios import VARIANTS, ScenarioResult, run_scenarios
from .stress import StressConfig, StressResult, run_stress

__all__ = ["VARIANTS", "LabError", "ScenarioResult", "StressConfig", "StressResult", "run_scenarios",
           "run_stress", "start_server"]
