"""Config loading: YAML files of the original's keys, validated once into a typed `LynxConfig`."""
from configs.schema import DataConfig, LynxConfig, VitConfig, load_config, parse_override

__all__ = ["DataConfig", "LynxConfig", "VitConfig", "load_config", "parse_override"]
