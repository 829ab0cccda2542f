"""Task environments for evaluating and training the orchestrator: WideGeo and DeepGeo.

`get_env(name)` returns a ready environment; see base.Environment for the interface.
"""

from __future__ import annotations

from typing import Any, Callable

from planner.envs.base import Environment, Score, Task
from planner.envs.deepgeo import DeepGeoEnv
from planner.envs.widegeo import WideGeoEnv

ENVIRONMENTS: dict[str, Callable[..., Environment]] = {
    "widegeo": WideGeoEnv,
    "deepgeo": DeepGeoEnv,
}


def list_envs() -> list[str]:
    return sorted(ENVIRONMENTS)


def get_env(name: str, **kwargs: Any) -> Environment:
    """The environment called `name` ("widegeo", "deepgeo"); kwargs go to its constructor
    (e.g. corpus_path=..., rel_tol=...)."""
    try:
        factory = ENVIRONMENTS[name]
    except KeyError:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(list_envs())}") from None
    return factory(**kwargs)


__all__ = ["Environment", "Score", "Task", "WideGeoEnv", "DeepGeoEnv", "get_env", "list_envs", "ENVIRONMENTS"]
