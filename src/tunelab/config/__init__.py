"""Typed configs: YAML files, dotted key=value overrides, validation with clear messages (no torch here)."""

from tunelab.config.loading import apply_overrides, dump_config, load_config, read_yaml, validate

__all__ = ["apply_overrides", "dump_config", "load_config", "read_yaml", "validate"]
from tunelab.config.schema import TrainConfig  # noqa: E402

__all__ += ["TrainConfig"]
