"""The prompt template checked once, when the config is read: a template no record could fill is one line at start,
not one error per record. Fields a record lacks stay that record's problem (dataset.prompt)."""
from __future__ import annotations

import re
import string

_FIELD_NAME = re.compile(r"[^.\[\]]+(\.[^.\[\]]+|\[[^\]]+\])*")


def prompt_problem(template: str) -> str | None:
    """What makes `template` unusable for every record (syntax, a field without a name, a conversion or a format
    spec that suits no text or number), or None. Fields the record lacks are the record's problem, not this."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        return f"is not a valid template ({err}; a literal brace is written {{{{ or }}}})"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not _FIELD_NAME.fullmatch(name) or name.split(".")[0].split("[")[0].isdigit():
            return f"has the field {shown}, which names no record field (write e.g. {{question}})"
        if conversion not in (None, "r", "s", "a"):
            return f"has the field {shown}: '!{conversion}' is no conversion (!r, !s or !a)"
        if "{" in spec:
            nested = prompt_problem(spec)
            if nested:
                return nested
            continue
        probes = ("",) if conversion else ("", 0, 0.0)
        if spec and not any(_formats(probe, spec) for probe in probes):
            return f"has the field {shown}: the format spec ':{spec}' suits no text or number"
    return None


def _formats(probe, spec: str) -> bool:
    try:
        format(probe, spec)
    except (ValueError, TypeError):
        return False
    return True
