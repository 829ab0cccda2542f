"""The built-in policy: which model a demo or an evaluation runs on, and the engine that serves it.

Model selection (`select_model`), shared by `swarm demo` and `swarm eval`:
  1. an explicit `--checkpoint DIR`: that checkpoint on this project's engine;
  2. else a configured model (SWARM_LLM_* endpoint, or settings with backend "engine"): used as it is;
  3. else the built-in policy shipped in `planner/builtin_policy/` on this project's engine.
With no model at all, `NoModelError` carries the message that says how to get one.

`running_model(selection, tp=...)` then starts the engine (when the selection needs one) on the
current Ray cluster as a named actor with T tensor-parallel shards, yields the `LLMConfig` jobs use
(`backend="engine"`, `engine_actor=<name>`) and stops the engine on exit. `start_engine` /
`stop_engine` are the same two steps for callers that manage the lifetime themselves.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from planner.prompts import SUBAGENT_SYSTEM_PROMPT
from swarm.config import Settings
from swarm.placement import PlacementConfig
from swarm.plans import LLMConfig

Orchestrator = Literal["agent", "plan"]

BUILTIN_POLICY_DIR: Path = Path(__file__).resolve().parent / "builtin_policy"
# The built-in policy is trained on both orchestrator forms; plan mode is the default until
# measurements say otherwise (docs/policy.md).
BUILTIN_ORCHESTRATOR: Orchestrator = "plan"
# A configured endpoint (e.g. Kimi K2.5) keeps the K2.5 create/assign orchestrator.
ENDPOINT_ORCHESTRATOR: Orchestrator = "agent"
ENGINE_NAME_PREFIX = "swarm-builtin-policy"
# Generous: on a busy CPU a call may wait behind many sub-agents' calls in the engine's batch, and
# a timed-out call is sent again (more load), so a short timeout only makes things worse.
ENGINE_CALL_TIMEOUT_S = 900.0
DEFAULT_ENGINE_SLOTS = 32
_ENGINES: dict[str, Any] = {}  # engine actor name -> its handle, for the engines start_engine started

TRAIN_HELP = """\
No policy to run the agents on: {problem}.

The built-in policy ships in planner/builtin_policy (docs/policy.md has how it
was trained and how well it does). To train it again, one script runs every stage
(python -m planner.sft and copy_pretrain runs: ~3.5 hours on 2 cores, two on a
CUDA GPU, then ~1.2 hours on the CPU) and writes it into the directory the demo reads:

  scripts/train_builtin_policy.sh checkpoints/builtin-run planner/builtin_policy

or run on another checkpoint directory with --checkpoint DIR, or on any OpenAI-compatible endpoint:

  export SWARM_LLM_BASE_URL=https://api.moonshot.ai/v1
  export SWARM_LLM_API_KEY=sk-...
  export SWARM_LLM_MODEL=kimi-k2.5

(the same fields can live in a YAML file given by --config or $SWARM_CONFIG, key `llm`).
"""


class CheckpointError(ValueError):
    """A checkpoint directory is missing or unusable; the message names the path and what is wrong."""


class NoModelError(RuntimeError):
    """No model to run the agents on; the message says how to get one (the CLI exits 2)."""


# ------------------------------------------------------------------------------- checkpoints

def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a readable safetensors file, or None. Reads only the header."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if head.startswith(b"version "):  # a Git LFS pointer checked out without `git lfs pull`
                return f"{path} is a Git LFS pointer, not the weights (run `git lfs pull`)"
            if len(head) < 8:
                return f"{path} is truncated ({len(head)} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > 100 * 1024 * 1024:
                return f"{path} is not a safetensors file (header length {n})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path} is not a readable safetensors file: {e}"
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        return f"{path} holds no tensors"
    return None


def checkpoint_problems(path: str | Path) -> list[str]:
    """Everything that keeps `path` from being served as a policy checkpoint (empty: it looks usable)."""
    from model_shards.checkpoint import (
        INDEX_FILE,
        SINGLE_FILE,
        list_checkpoint_files,
        read_config,
    )

    root = Path(path).expanduser()
    if not root.exists():
        return [f"{root} does not exist"]
    if not root.is_dir():
        return [f"{root} is not a directory"]
    problems: list[str] = []
    try:
        read_config(root)
    except FileNotFoundError:
        problems.append(f"{root} has no config.json")
    except (ValueError, TypeError) as e:  # bad JSON or fields the model config does not accept
        problems.append(f"{root / 'config.json'} is not a valid model config: {e}")
    try:
        files = list_checkpoint_files(root)
    except FileNotFoundError:
        problems.append(f"{root} has no weights ({SINGLE_FILE} or {INDEX_FILE})")
        files = []
    except ValueError as e:
        problems.append(str(e))
        files = []
    problems += [p for p in map(_safetensors_problem, files) if p]
    tok = _policy_tokenizer(root)
    if (tok == "." or (root / "tokenizer_config.json").is_file()) and not (root / "tiktoken.model").is_file():
        problems.append(f"{root} has no tiktoken.model (its tokenizer vocabulary)")
    return problems


def check_checkpoint(path: str | Path) -> Path:
    """The resolved checkpoint directory; raises CheckpointError naming the path and what is missing."""
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError("checkpoint " + str(Path(path).expanduser()) + " cannot be served: " + "; ".join(problems))
    return Path(path).expanduser().resolve()


def builtin_policy_available(path: str | Path | None = None) -> bool:
    """Whether `path` (default: the built-in policy's directory) holds a servable checkpoint."""
    return not checkpoint_problems(BUILTIN_POLICY_DIR if path is None else path)


def _policy_tokenizer(root: Path) -> str | None:
    """The `tokenizer` field of the checkpoint's policy.json (written by planner.sft), if any."""
    try:
        value = json.loads((root / "policy.json").read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def checkpoint_tokenizer(path: str | Path) -> str:
    """The tokenizer spec the engine loads for this checkpoint: its tiktoken.model when it ships one,
    else the byte vocabulary the policy was trained with (policy.json), else plain bytes."""
    from model_shards.serve import default_tokenizer

    root = Path(path).expanduser()
    spec = default_tokenizer(str(root))
    if spec == "byte":
        tok = _policy_tokenizer(root)
        if tok is not None and (tok == "byte" or tok.startswith("byte:")):
            return tok
    return spec


# ------------------------------------------------------------------------------- the engine

def start_engine(
    checkpoint: str | Path,
    tp: int = 2,
    name: str | None = None,
    *,
    num_slots: int = DEFAULT_ENGINE_SLOTS,
    max_len: int | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    dtype: str = "float32",
    device: str = "cpu",
    placement: PlacementConfig | None = None,
    timeout_s: float = ENGINE_CALL_TIMEOUT_S,
) -> LLMConfig:
    """Start the model_shards engine for `checkpoint` on the current Ray cluster as the named actor
    `name` (default: a fresh `swarm-builtin-policy-<id>`), its model split over `tp` shards in one
    placement group, and return the LLMConfig that jobs use to reach it. Greedy by default
    (temperature 0), so a run is repeatable. Raises CheckpointError for an unusable checkpoint and
    RuntimeError when Ray is not running."""
    import ray

    from model_shards.checkpoint import read_config
    from model_shards.model_runner import RunnerSpec
    from model_shards.shards import launch_engine_actor
    from swarm.placement import model_shard_resources

    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    root = check_checkpoint(checkpoint)
    if not ray.is_initialized():
        raise RuntimeError("start_engine needs a running Ray (start a SwarmRuntime or call ray.init() first)")
    cfg = read_config(root)
    ctx = cfg.max_position_embeddings if max_len is None else max_len
    if ctx < 16:
        raise ValueError(f"max_len must be >= 16, got {ctx}")
    name = name or f"{ENGINE_NAME_PREFIX}-{uuid.uuid4().hex[:8]}"
    spec = RunnerSpec(checkpoint=str(root), num_slots=num_slots, max_len=ctx, dtype=dtype, device=device)
    engine_kwargs: dict[str, Any] = {}
    if tp > 1:
        # A laptop with fewer CPUs than shards still fits them (each shard runs one thread anyway).
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        engine_kwargs["num_cpus_per_shard"] = min(1.0, cpus / tp)
        extra = model_shard_resources(placement) if placement is not None else {}
        if extra:
            engine_kwargs["shard_resources"] = extra
    # Ray destroys an actor once no handle to it is left, name or not: keep one until stop_engine.
    _ENGINES[name] = launch_engine_actor(name, spec, tp, tokenizer=checkpoint_tokenizer(root), model_name=root.name,
                                         **engine_kwargs)
    return LLMConfig(backend="engine", engine_actor=name, model=root.name, temperature=temperature,
                     max_tokens=max_tokens, timeout_s=timeout_s, max_retries=1)


def stop_engine(name: str) -> bool:
    """Close and kill the engine actor `name` (its shards go with it); False if there was none."""
    import ray

    actor = _ENGINES.pop(name, None)
    if actor is None:
        try:
            actor = ray.get_actor(name)
        except ValueError:
            return False
    try:
        ray.get(actor.close.remote(), timeout=30)
    except Exception:  # closing is a courtesy; the kill below is what frees the shards
        pass
    ray.kill(actor)
    return True


# ------------------------------------------------------------------------------- selection

@dataclass
class ModelSelection:
    """Which model the agents run on, decided before anything starts."""

    llm: LLMConfig | None  # a configured model; None: start the engine on `checkpoint`
    checkpoint: Path | None
    orchestrator: Orchestrator
    single_agent_prompt: str | None  # None: the evaluation's generic single-agent prompt

    @property
    def builtin(self) -> bool:
        return self.checkpoint is not None

    def describe(self, tp: int | None = None) -> str:
        if self.checkpoint is not None:
            return f"policy {self.checkpoint} on this project's engine" + (f" (TP={tp} shards)" if tp else "")
        assert self.llm is not None
        if self.llm.backend == "engine":
            return f"engine actor {self.llm.engine_actor}"
        return f"endpoint {self.llm.base_url} (model {self.llm.model})"


def endpoint_configured(settings: Settings) -> bool:
    """Whether the settings name a model: an OpenAI-compatible endpoint with a model, or an engine actor."""
    llm = settings.llm
    if llm.backend == "engine":
        return bool(llm.engine_actor)
    return bool(llm.base_url and llm.model)


def select_model(settings: Settings, checkpoint: str | Path | None = None,
                 orchestrator: str | None = None) -> ModelSelection:
    """Decide the model (see the module doc). Raises NoModelError when there is none (no endpoint and
    no servable built-in policy, or an explicit checkpoint that cannot be served: the message names
    the path, what is wrong and how to train one), ValueError for an unknown orchestrator."""
    if orchestrator is not None and orchestrator not in ("agent", "plan"):
        raise ValueError(f"--orchestrator must be 'agent' or 'plan', got {orchestrator!r}")
    if checkpoint is None and endpoint_configured(settings):
        return ModelSelection(settings.llm, None, orchestrator or ENDPOINT_ORCHESTRATOR, None)  # type: ignore[arg-type]
    root = Path(checkpoint).expanduser() if checkpoint is not None else BUILTIN_POLICY_DIR
    problems = checkpoint_problems(root)
    if problems:
        what = "the checkpoint" if checkpoint is not None else "the built-in policy"
        raise NoModelError(TRAIN_HELP.format(problem=f"{what} {root} cannot be served: " + "; ".join(problems)))
    root = root.resolve()
    # The policy was trained with this sub-agent prompt; a single agent is one such sub-agent.
    return ModelSelection(None, root, orchestrator or BUILTIN_ORCHESTRATOR, SUBAGENT_SYSTEM_PROMPT)  # type: ignore[arg-type]


@contextmanager
def running_model(selection: ModelSelection, *, tp: int = 2, placement: PlacementConfig | None = None,
                  **engine_options: Any) -> Iterator[LLMConfig]:
    """The LLMConfig of the selected model, with its engine running (started on the current Ray
    cluster when the selection needs one, stopped on exit). `engine_options` go to start_engine."""
    if selection.checkpoint is None:
        assert selection.llm is not None
        yield selection.llm
        return
    llm = start_engine(selection.checkpoint, tp, placement=placement, **engine_options)
    try:
        yield llm
    finally:
        assert llm.engine_actor is not None
        stop_engine(llm.engine_actor)
