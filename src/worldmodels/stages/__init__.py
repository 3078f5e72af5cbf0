"""Pipeline stages: each has a config dataclass and a `run(cfg)` that does the work."""
