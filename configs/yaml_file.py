"""Reading a config file: YAML's safe loader, with a key given twice refused."""
from __future__ import annotations

import os

import yaml

from errors import InputError


class RepeatedKey(yaml.MarkedYAMLError):
    """A key given twice in one mapping of a config file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the last one silently, and
    which of two `num_beams:` lines counts is not for a reader to guess."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in first:
                raise RepeatedKey(problem=f"'{key}' is given twice (first on line {first[key] + 1}); keep one",
                                  problem_mark=key_node.start_mark)
            if key is not None:
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_config_file(path: str) -> dict:
    """The mapping of a YAML config file; a missing file, bad YAML or a repeated key is one line naming file:line."""
    if not os.path.isfile(path):
        raise InputError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        kind = "" if isinstance(err, RepeatedKey) else "YAML syntax error: "
        raise InputError(f"{path}{line}: {kind}{problem}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of config keys at the top level")
    return raw
