"""The decoding options of one answer, as a value (`DecodingSettings`), and the one place where each option is
defined: its default (LYNX.yaml's value), its check, and what the rest of Lynx derives from it:

- the config key of the same name (`config_keys`: LynxConfig's decoding keys, checked by `checked`);
- the server's request field (`request_fields`), under the option's name unless `request` gives another, and for
  an option that sets a request's cost a bound (`limit`: the default of serve.py's `--<field>-limit`);
- transformers' GenerationConfig key (`hf`, decoding/hf.py), set where the option is used;
- the search's resolved form (`resolved`, decoding/search.py): where an option changes nothing for these settings
  (sampling keys without sampling, length_penalty with one beam), its `neutral` value, so settings that decode alike
  resolve alike.

A new option is added in three places: its field and check here; its rule in Lynx's decoder (decoding/processors.py
or decoding/search.py); its rule in the 4.28.1 reference of the tests (tests/reference_428.py).

Names and meanings are the original's config keys, so a message about a bad value names the key a user wrote.
`min_length` counts as the original's transformers 4.28 counted it: the output began with a one-token BOS
placeholder, so `min_length: 2` means "EOS may not be the first new token".
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

from errors import InputError

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def always(settings) -> bool:
    return True


def sampling(settings) -> bool:
    return settings.use_nucleus_sampling


def beams(settings) -> bool:
    return settings.num_beams > 1


@dataclass(frozen=True)
class Option:
    """One decoding option as the rest of Lynx sees it (the module's doc says where each part goes)."""

    kind: type  # int, float or bool: the type of its default
    check: Callable[[Any, Any], str | None]  # (value, settings) -> what is allowed when the value is not, else None
    used: Callable[[Any], bool] = always  # whether the value changes the decoding of these settings
    neutral: Any = None  # the value that stands in for it where it is not used
    request: str | None = None  # the request field: None for the option's own name, "" for none
    limit: int | None = None  # the server's default bound of a request's value
    hf: str | None = None  # GenerationConfig's key: None for the option's own name
    to_hf: Callable[[Any], Any] = lambda value: value


def option(default, check=lambda value, settings: None, **derived) -> Any:
    """A field of DecodingSettings: its default and check, and what is derived from it (see Option)."""
    return dataclasses.field(default=default, metadata={"option": Option(type(default), check, **derived)})


def at_least(low: int, meaning: str = ""):
    """The check `low` or more: 'must be at least 1', or with what `low` means, 'must be 0 (off) or more'."""
    allowed = f"must be {low} ({meaning}) or more" if meaning else f"must be at least {low}"
    return lambda value, settings: None if value >= low else allowed


def _min_length(value, s) -> str | None:
    if 0 <= value <= s.max_new_tokens + 1:
        return None
    return (f"must be between 0 and max_new_tokens + 1 = {s.max_new_tokens + 1} (it counts a placeholder token, as "
            f"the original did)")


def _temperature(value, s) -> str | None:
    if not s.use_nucleus_sampling or (value > 0 and math.isfinite(value)):
        return None
    return "must be a number greater than 0 when sampling (use_nucleus_sampling: true)"


def _length_penalty(value, s) -> str | None:
    if not math.isfinite(value):
        return "must be a finite number"
    bound = math.floor(math.log(sys.float_info.max) / math.log(s.max_new_tokens + 1))  # lengths count the placeholder
    if abs(value) > bound:
        return f"must be between -{bound} and {bound}, so that (max_new_tokens + 1) ** length_penalty is finite"
    return None


@dataclass(frozen=True)
class DecodingSettings:
    """Frozen and hashable: a decoder resolves each distinct value once. Built from a config (`from_config`), then
    varied per call (`replace`). Every field is an `option` (see the module's doc)."""

    max_new_tokens: int = option(64, at_least(1), request="max_tokens", limit=1024)
    min_length: int = option(2, _min_length, hf="min_new_tokens", to_hf=lambda value: max(value - 1, 0))
    num_beams: int = option(5, at_least(1), limit=10)
    use_nucleus_sampling: bool = option(True, request="", hf="do_sample")  # a request's temperature sets it
    temperature: float = option(1.0, _temperature, used=sampling, neutral=1.0)  # not in the original's config: 1.0
    top_k: int = option(3, at_least(0, "no top-k"), used=sampling, neutral=0, limit=100)
    top_p: float = option(0.9, lambda value, s: None if 0 <= value <= 1 else "must be from 0 to 1 (0: the top token)",
                          used=sampling, neutral=1.0)
    no_repeat_ngram_size: int = option(2, at_least(0, "off"))
    length_penalty: float = option(-2.0, _length_penalty, used=beams, neutral=1.0)
    repetition_penalty: float = option(  # not in the original's config, which always passed 1.0
        1.0, lambda value, s: None if value > 0 and math.isfinite(value) else "must be a number greater than 0")

    @property
    def do_sample(self) -> bool:
        return self.use_nucleus_sampling

    @classmethod
    def options(cls) -> dict[str, Option]:
        """{name: Option} of every option, in order."""
        return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}

    @classmethod
    def from_config(cls, cfg) -> "DecodingSettings":
        """The settings of a LynxConfig (or anything with the same attributes)."""
        return cls(**{name: getattr(cfg, name) for name in cls.options()})

    def replace(self, **changes) -> "DecodingSettings":
        """These settings with some keys changed, checked."""
        unknown = sorted(set(changes) - set(self.options()))
        if unknown:
            raise InputError(f"unknown decoding key '{unknown[0]}'")
        return dataclasses.replace(self, **changes).checked()

    def checked(self, where: str = "decoding") -> "DecodingSettings":
        """Self, or InputError naming the key, the value and what is allowed."""
        problem = self.problem()
        if problem:
            raise InputError(f"{where}: {problem[1]}")
        return self

    def problem(self, names: dict[str, str] | None = None) -> tuple[str, str] | None:
        """(option, what is wrong in one line) of the first option with a bad value, or None. `names`: the words
        that name an option in the line (the server's request fields), else its key."""
        options = self.options()
        for name, opt in options.items():  # types first: the value checks compare numbers
            value = getattr(self, name)
            if isinstance(value, bool) != (opt.kind is bool) or not isinstance(value, (int, float)) or (
                    opt.kind is int and not isinstance(value, int)):
                return name, f"'{(names or {}).get(name, name)}' must be {_TYPE_WORDS[opt.kind]}, got {value!r}"
        for name, opt in options.items():
            allowed = opt.check(getattr(self, name), self)
            if allowed:
                return name, f"'{(names or {}).get(name, name)}' {allowed}, got {getattr(self, name)}"
        return None

    def resolved(self) -> dict[str, Any]:
        """{name: value} as the decoder uses it: the neutral value of an option these settings do not use, floats
        as floats."""
        return {name: (opt.kind(getattr(self, name)) if opt.used(self) else opt.neutral)
                for name, opt in self.options().items()}

    def hf(self) -> dict[str, Any]:
        """transformers' GenerationConfig keys of the options these settings use."""
        return {opt.hf or name: opt.to_hf(getattr(self, name)) for name, opt in self.options().items()
                if opt.used(self)}


def config_keys(settings: type = DecodingSettings) -> type:
    """A (mutable) dataclass of the settings' fields with their defaults: LynxConfig's decoding keys."""
    return dataclasses.make_dataclass("DecodingKeys", [
        (f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(settings)])


def request_fields(settings: type = DecodingSettings) -> dict[str, str]:
    """{option: the server's request field} of the options a request may set."""
    return {name: opt.request or name for name, opt in settings.options().items() if opt.request != ""}


def request_limits(settings: type = DecodingSettings) -> dict[str, int]:
    """{request field: default bound} of the options whose value sets a request's cost."""
    fields = request_fields(settings)
    return {fields[name]: opt.limit for name, opt in settings.options().items() if opt.limit is not None}
