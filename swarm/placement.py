"""Where the swarm's actors go on a Ray cluster: which custom resources they ask for, and how they spread.

ray_cluster.yaml gives node types custom resources: `swarm_head` (the service and the job host actors),
`swarm_worker` (sub-agent worker actors and their tools) and `swarm_model` (model shard replicas).
The placement asks for a resource only when the connected cluster has it (mode "auto"), so the
same settings work on a laptop, where no node has any of them, and on a cluster. Mode "require"
asks for it anyway (an actor then waits until a node with it joins, e.g. through the autoscaler);
mode "off" never asks. Worker actors are spread over the nodes that can host them (SPREAD), so a
lost node takes only its share of the running sub-agents with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PlacementMode = Literal["auto", "require", "off"]

# Fractions small enough that one node's single `swarm_head: 1` hosts a thousand job host actors,
# while a worker actor takes one whole `swarm_worker` unit (a node with 16 hosts 16 workers).
DEFAULT_JOB_ACTOR_AMOUNT = 0.001


class PlacementConfig(BaseModel):
    """Operator settings for placement (Settings.placement; YAML key `placement`)."""

    model_config = ConfigDict(extra="forbid")

    mode: PlacementMode = Field("auto", description="auto: ask for a resource only if some node has it")
    head_resource: str | None = Field("swarm_head", description="resource of the node(s) for job host actors")
    job_actor_amount: float = Field(DEFAULT_JOB_ACTOR_AMOUNT, gt=0, le=1)
    worker_resource: str | None = Field("swarm_worker", description="resource of nodes for worker actors")
    worker_amount: float = Field(1.0, gt=0)
    worker_strategy: Literal["SPREAD", "DEFAULT"] = Field("SPREAD", description="how worker actors spread")
    model_resource: str | None = Field("swarm_model", description="resource per model shard (one per GPU)")


def _wanted(name: str | None, amount: float, mode: PlacementMode, available: dict[str, float]) -> dict[str, float]:
    if name is None or mode == "off":
        return {}
    if mode == "auto" and available.get(name, 0.0) <= 0:
        return {}
    return {name: amount}


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected Ray cluster (every node, busy or not)."""
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}


def job_actor_options(cfg: PlacementConfig | None, available: dict[str, float] | None = None) -> dict[str, Any]:
    """Extra `.options(...)` for a job host actor: on the head node when the cluster has `swarm_head`."""
    if cfg is None:
        return {}
    avail = cluster_resources() if available is None else available
    res = _wanted(cfg.head_resource, cfg.job_actor_amount, cfg.mode, avail)
    return {"resources": res} if res else {}


def worker_actor_options(cfg: PlacementConfig | None, available: dict[str, float] | None = None) -> dict[str, Any]:
    """Extra `.options(...)` for a sub-agent worker actor: on `swarm_worker` nodes, spread over them."""
    if cfg is None:
        return {}
    avail = cluster_resources() if available is None else available
    out: dict[str, Any] = {}
    res = _wanted(cfg.worker_resource, cfg.worker_amount, cfg.mode, avail)
    if res:
        out["resources"] = res
    if cfg.worker_strategy == "SPREAD":
        out["scheduling_strategy"] = "SPREAD"
    return out


def model_shard_resources(cfg: PlacementConfig | None, available: dict[str, float] | None = None) -> dict[str, float]:
    """Custom resources one model shard's placement-group bundle adds to its CPU/GPU: one unit of
    `swarm_model` when the cluster has it. Pass it as `shard_resources` to
    model_shards.engine.build_engine / shards.launch_engine_actor (or `--shard-resources` of
    `python -m model_shards.serve`); the T bundles of a replica go in one STRICT_PACK group."""
    if cfg is None:
        return {}
    avail = cluster_resources() if available is None else available
    return _wanted(cfg.model_resource, 1.0, cfg.mode, avail)
