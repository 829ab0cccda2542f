"""Write the fixed evaluation sets: `python -m planner.envs.make_eval_sets [--out DIR] [--check]`.

Each set is `tasks("test", n, seed)` of its environment with a held-out seed that training never
uses (training seeds are small non-negative integers; these are in the millions). Output is
byte-for-byte deterministic, so the files can be committed and checked in CI with --check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from planner.envs import get_env
from planner.envs.base import EVAL_SETS_DIR, EvalSetFile, eval_set_path

# (env, version) -> (seed, number of tasks). A new version gets a new entry; old ones never change.
EVAL_SET_SPECS: dict[tuple[str, str], tuple[int, int]] = {
    ("widegeo", "v1"): (7_000_001, 30),
    ("deepgeo", "v1"): (7_000_002, 30),
    # v2: a second held-out set, written after stage 23 was chosen on v1, so a policy can be judged
    # on tasks nothing was selected on.
    ("widegeo", "v2"): (7_000_003, 30),
    ("deepgeo", "v2"): (7_000_004, 30),
    # v3: written in session 16 before any stage was judged on it, to average stages over 90 tasks
    # (one greedy run of 30 tasks moves by ~0.08 between sets).
    ("widegeo", "v3"): (7_000_005, 30),
    ("deepgeo", "v3"): (7_000_006, 30),
}


def render_eval_set(env_name: str, version: str) -> bytes:
    seed, n = EVAL_SET_SPECS[(env_name, version)]
    tasks = get_env(env_name).tasks("test", n, seed)
    data = EvalSetFile(env=env_name, version=version, split="test", seed=seed, n=n, tasks=tasks)
    return orjson.dumps(data.model_dump(mode="json"), option=orjson.OPT_INDENT_2) + b"\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=EVAL_SETS_DIR, help="directory to write the JSON files to")
    parser.add_argument("--check", action="store_true", help="only verify the files match the generator")
    args = parser.parse_args(argv)
    stale = []
    for env_name, version in sorted(EVAL_SET_SPECS):
        path = eval_set_path(env_name, version, args.out)
        content = render_eval_set(env_name, version)
        if args.check:
            if not path.is_file() or path.read_bytes() != content:
                stale.append(str(path))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        print(f"wrote {path} ({len(content):,} bytes)")
    if stale:
        print("eval sets differ from their generator: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
