"""PARL: training the plan-mode orchestrator from the rewards of parallel swarm rollouts (docs/PARL.md)."""

from planner.parl.config import PARLConfig, PARLConfigError, load_config

__all__ = ["PARLConfig", "PARLConfigError", "load_config"]
