"""Decoding as a value: built from the config, varied per call, checked with one clear line; the one definition of
each option, from which the config's keys, the server's request fields and bounds, transformers' keys and the
search's resolved form are derived."""
import dataclasses
import pickle

import pytest

import serve
from conftest import FIXTURE, build_tiny_lynx, fixture_config, read_jsonl
from configs.decoding import DecodingSettings, config_keys, option, request_fields, request_limits, sampling
from configs.schema import LynxConfig, config_from_dict
from errors import InputError, RecordError


def config_settings(**keys) -> DecodingSettings:
    return DecodingSettings.from_config(config_from_dict(fixture_config(**keys)))


def test_settings_carry_the_config_values():
    s = config_settings(num_beams=3, top_k=7, use_nucleus_sampling=False, min_length=4)
    assert (s.num_beams, s.top_k, s.do_sample, s.min_length) == (3, 7, False, 4)
    assert hash(s) == hash(config_settings(num_beams=3, top_k=7, use_nucleus_sampling=False, min_length=4))


@pytest.mark.parametrize("key, value, message", [
    ("temperature", 0.0, "'temperature' must be a number greater than 0 when sampling (use_nucleus_sampling: true), "
                         "got 0.0"),
    ("temperature", -1.0, "'temperature' must be a number greater than 0 when sampling (use_nucleus_sampling: true), "
                          "got -1.0"),
    ("temperature", float("inf"), "'temperature' must be a number greater than 0 when sampling "
                                  "(use_nucleus_sampling: true), got inf"),
    ("top_p", 2.0, "'top_p' must be from 0 to 1 (0: the top token), got 2.0"),
    ("top_p", -0.1, "'top_p' must be from 0 to 1 (0: the top token), got -0.1"),
    ("top_k", -1, "'top_k' must be 0 (no top-k) or more, got -1"),
    ("no_repeat_ngram_size", -1, "'no_repeat_ngram_size' must be 0 (off) or more, got -1"),
    ("repetition_penalty", 0.0, "'repetition_penalty' must be a number greater than 0, got 0.0"),
    ("length_penalty", float("nan"), "'length_penalty' must be a finite number, got nan"),
    ("min_length", 30, "'min_length' must be between 0 and max_new_tokens + 1 = 25 (it counts a placeholder token, "
                       "as the original did), got 30"),
    ("min_length", -1, "'min_length' must be between 0 and max_new_tokens + 1 = 25 (it counts a placeholder token, "
                       "as the original did), got -1"),
    ("num_beams", 0, "'num_beams' must be at least 1, got 0"),
    ("max_new_tokens", 0, "'max_new_tokens' must be at least 1, got 0"),
    ("num_beams", 2.0, "'num_beams' must be an integer, got 2.0"),
    ("max_new_tokens", True, "'max_new_tokens' must be an integer, got True"),
    ("top_k", "3", "'top_k' must be an integer, got '3'"),
    ("top_p", "0.9", "'top_p' must be a number, got '0.9'"),
    ("temperature", None, "'temperature' must be a number, got None"),
    ("use_nucleus_sampling", 1, "'use_nucleus_sampling' must be true or false, got 1"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, message):
    base = config_settings(max_new_tokens=24, use_nucleus_sampling=True)
    with pytest.raises(InputError) as err:
        base.replace(**{key: value})
    assert str(err.value) == f"decoding: {message}"
    with pytest.raises(InputError) as err:  # the same check when the config is read (types: by the schema)
        config_from_dict(fixture_config(**{"max_new_tokens": 24, "use_nucleus_sampling": True, key: value}),
                         where="c.yaml")
    if "must be an integer" in message or "must be a number, got" in message or "true or false" in message:
        assert str(err.value).startswith(f"c.yaml: '{key}' must be ")
    else:
        assert str(err.value) == f"c.yaml: {message}"


def test_temperature_zero_is_fine_without_sampling():
    assert config_settings(use_nucleus_sampling=False, temperature=0.0).temperature == 0.0


def test_unknown_key_is_refused():
    with pytest.raises(InputError, match="unknown decoding key 'beams'"):
        config_settings().replace(beams=2)


def test_record_error_survives_pickling():
    """DataLoader workers and ranks send errors to the main process as pickles."""
    error = pickle.loads(pickle.dumps(RecordError(17, "image file not found", "images/x.jpg")))
    assert (error.index, error.reason, error.path) == (17, "image file not found", "images/x.jpg")
    assert str(error) == "record 17 (images/x.jpg): image file not found"


def test_per_call_settings_change_the_decoding(monkeypatch):
    """A pipeline built with beam sampling answers with greedy search when a call asks for it."""
    from lynx.pipeline import LynxPipeline

    cfg, model, tokenizer = build_tiny_lynx(num_beams=5, use_nucleus_sampling=True, max_new_tokens=24)
    lynx = LynxPipeline(cfg, model, tokenizer, "cpu")
    monkeypatch.chdir(FIXTURE)
    records = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[:3]
    pairs = [(r["image"], r["question"]) for r in records]
    expected = {row["index"]: row["text_output"] for row in read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")}
    greedy = lynx.settings.replace(num_beams=1, use_nucleus_sampling=False)
    assert lynx.answer(pairs, settings=greedy) == [expected[r["index"]] for r in records]
    beam = {row["index"]: row["text_output"] for row in read_jsonl(FIXTURE / "expected" / "images_beam5.jsonl")}
    assert lynx.answer(pairs, settings=lynx.settings.replace(use_nucleus_sampling=False)) == \
        [beam[r["index"]] for r in records]


@dataclasses.dataclass(frozen=True)
class WithTypicalP(DecodingSettings):
    """A decoding option added as a new one would be: its field and check (its rules in the decoders aside)."""

    typical_p: float = option(1.0, lambda value, s: None if 0 < value <= 1 else "must be greater than 0 and at most 1",
                              used=sampling, neutral=1.0)


def test_a_new_option_appears_as_a_config_key_and_a_request_field():
    from server.protocol import ChatCompletionRequest, request_model

    keys = {f.name: f.default for f in dataclasses.fields(config_keys(WithTypicalP))}
    assert keys == {**{f.name: f.default for f in dataclasses.fields(config_keys())}, "typical_p": 1.0}
    fields = request_model(WithTypicalP).model_fields
    assert set(fields) == set(ChatCompletionRequest.model_fields) | {"typical_p"}
    assert fields["typical_p"].annotation == float | None
    s = WithTypicalP(typical_p=0.5)  # LYNX.yaml's decoding: beam sampling
    assert s.hf()["typical_p"] == 0.5 and s.resolved()["typical_p"] == 0.5
    off = dataclasses.replace(s, use_nucleus_sampling=False)
    assert "typical_p" not in off.hf() and off.resolved()["typical_p"] == 1.0  # unused without sampling
    with pytest.raises(InputError, match="^decoding: 'typical_p' must be greater than 0 and at most 1, got 0.0$"):
        s.replace(typical_p=0.0)
    assert "typical_p" not in request_limits(WithTypicalP)  # no bound unless the option says so


def test_the_config_the_server_and_the_search_take_the_options_from_the_settings():
    from decoding.search import Search, resolve
    from server.protocol import ChatCompletionRequest

    options = DecodingSettings.options()
    config = {f.name: f.default for f in dataclasses.fields(LynxConfig)}
    assert {name: config[name] for name in options} == {f.name: f.default for f in dataclasses.fields(DecodingSettings)}
    assert request_fields() == {name: name for name in options if name != "use_nucleus_sampling"} | {
        "max_new_tokens": "max_tokens"}  # a request's temperature sets use_nucleus_sampling
    assert set(request_fields().values()) < set(ChatCompletionRequest.model_fields)
    assert request_limits() == {"max_tokens": 1024, "num_beams": 10, "top_k": 100}
    args = serve.parse_args([])
    assert (args.max_tokens_limit, args.num_beams_limit, args.top_k_limit) == (1024, 10, 100)
    assert serve.limits_of(serve.parse_args(["--top-k-limit", "7"])).decoding["top_k"] == 7
    greedy = DecodingSettings().replace(use_nucleus_sampling=False, num_beams=1, top_p=0.0)
    search = resolve(greedy, pad_id=0, eos_id=2, bos_id=1)
    assert set(options) < {f.name for f in dataclasses.fields(Search)}
    assert dataclasses.asdict(search) == {**greedy.resolved(), "eos_id": 2, "pad_id": 0, "bos_id": 1,
                                          "early_stopping": False}
    assert (search.top_p, search.top_k, search.temperature, search.length_penalty) == (1.0, 0, 1.0, 1.0)
