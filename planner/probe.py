"""Probe a policy checkpoint's first sub-agent turn on held-out WideGeo tasks, in one process.

    python -m planner.probe --checkpoint checkpoints/sft3 --tasks 5 18 --max-tokens 120

For each task of the fixed eval set: the sub-agent prompt the built-in policy was trained on, the
task, the `search` tool; greedy decoding on this project's engine (no Ray, one process) under the
same tool-call grammar the swarm uses. It prints the task's subject and the first turn, and whether
the subject was copied into the turn: the cheapest sign that a checkpoint copies from its context
(a held-out country was never in training), seconds where `swarm eval` takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from model_shards.chat_template import encode_chat
from model_shards.engine import build_engine
from model_shards.engine_api import GenerationRequest, SamplingParams
from model_shards.model_runner import RunnerSpec
from model_shards.structured import tool_call_grammar
from planner.builtin import checkpoint_tokenizer
from planner.envs import get_env
from planner.envs.widegeo import task_subject
from planner.prompts import SUBAGENT_SYSTEM_PROMPT
from workers.tools import make_search_tool


@dataclass
class ProbeResult:
    task_id: str
    subject: str
    turn: str

    @property
    def copied_subject(self) -> bool:
        return self.subject in self.turn


def probe(checkpoint: str, task_indices: list[int], max_tokens: int = 120) -> list[ProbeResult]:
    env = get_env("widegeo")
    tasks = env.eval_set()
    bad = [i for i in task_indices if not 0 <= i < len(tasks)]
    if bad:
        raise ValueError(f"task indices {bad} are outside the eval set (0..{len(tasks) - 1})")
    engine = build_engine(RunnerSpec(checkpoint=checkpoint, num_slots=1, max_len=4096), 1,
                          tokenizer=checkpoint_tokenizer(checkpoint), use_ray=False)
    search = make_search_tool(str(env.corpus_path()))
    spec = search.spec().to_openai()

    async def run() -> list[ProbeResult]:
        out = []
        for i in task_indices:
            task = tasks[i]
            messages = [{"role": "system", "content": SUBAGENT_SYSTEM_PROMPT}, {"role": "user", "content": task.prompt}]
            req = GenerationRequest(f"probe-{i}", encode_chat(engine.tokenizer, messages, [spec]),
                                    SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                    tool_call_grammar([spec], "auto"))
            res = await engine.complete(req)
            out.append(ProbeResult(task.id, task_subject(task), res.text))
        await engine.close()
        return out

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m planner.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", type=int, nargs="+", default=[5], help="indices into the WideGeo eval set")
    p.add_argument("--max-tokens", type=int, default=120)
    a = p.parse_args(argv)
    try:
        results = probe(a.checkpoint, a.tasks, a.max_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.task_id}  subject {r.subject!r}  copied: {'yes' if r.copied_subject else 'no'}")
        print("  " + r.turn.replace("\n", "\n  "))
    print(f"subject copied in {sum(r.copied_subject for r in results)}/{len(results)} first turns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
