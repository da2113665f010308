"""diffbench harness: registry, config, runner, models, prompts, CLI, leaderboards."""

__version__ = "0.1.0"
