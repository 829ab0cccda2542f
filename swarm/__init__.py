"""agent-swarm core: plans, DAG validation, the Ray runtime, the job service and the CLI."""

__version__ = "0.1.0"
