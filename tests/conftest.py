"""Shared fixtures. Test doubles live in tests/ and are named as such (see scripted_policy.py)."""

from __future__ import annotations

import os

import pytest

# Triton kernels run on CPU through the interpreter in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting one costs ~3 s)."""
    import ray
    import ray.cloudpickle

    import tests.runtime_test_tools
    import tests.scripted_policy

    # Test doubles travel to Ray workers by value, so workers need not import tests/.
    ray.cloudpickle.register_pickle_by_value(tests.scripted_policy)
    ray.cloudpickle.register_pickle_by_value(tests.runtime_test_tools)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="agent-swarm-tests", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny-preset policy checkpoint with random weights (seed 0), HF format: the PARL tests' policy."""
    import torch

    from model_shards.checkpoint import save_checkpoint
    from model_shards.config import ModelConfig
    from model_shards.model import KimiK2ForCausalLM

    torch.manual_seed(0)
    mcfg = ModelConfig.preset("tiny")
    path = tmp_path_factory.mktemp("tiny-random") / "policy"
    save_checkpoint(KimiK2ForCausalLM(mcfg, dtype=torch.float32), mcfg, path)
    return str(path)
