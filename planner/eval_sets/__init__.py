"""Fixed, versioned evaluation sets (JSON), written by `python -m planner.envs.make_eval_sets`."""
