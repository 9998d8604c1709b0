"""Typed configs (`schema`), their loader, and the YAML groups beside them."""
from twotower.configs.loader import ConfigError, from_container, load_config, to_yaml
from twotower.configs.schema import Config

__all__ = ["Config", "ConfigError", "from_container", "load_config", "to_yaml"]
