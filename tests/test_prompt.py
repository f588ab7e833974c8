"""Prompt text, token ids, padding and decoding: the original's rules, quirks included; the warning when prompts are
cut."""
import json
import logging

import pytest
import torch

from conftest import FIXTURE
from errors import RecordError
from dataset.prompt import format_prompt, pad_batch
from models.tokenizer import LynxTokenizer

TEMPLATE = "User: {question}\nBot:"


@pytest.fixture(scope="module")
def tokenizer():
    return LynxTokenizer(str(FIXTURE / "data" / "vicuna-7b" / "tokenizer.model"))


def meta_rows():
    rows = []
    for name, data in (("images", "Open_VQA_images_tiny.jsonl"), ("videos", "Open_VQA_videos_tiny.jsonl")):
        records = {r["index"]: r for r in map(json.loads, open(FIXTURE / "data" / data))}
        for meta in map(json.loads, open(FIXTURE / "expected" / f"{name}_meta.jsonl")):
            rows.append((records[meta["index"]], meta))
    return rows


def test_prompt_and_ids_equal_the_original_on_every_fixture_record(tokenizer):
    for record, meta in meta_rows():
        text = format_prompt(TEMPLATE, record, lower_text=True)
        assert text == meta["prompt_text"]
        assert tokenizer.encode(text, 40) == meta["input_ids"]
        assert tokenizer.decode(meta["greedy_ids"]) == meta["greedy_text"]


def test_lowercasing_covers_the_template_and_unicode():
    text = format_prompt(TEMPLATE, {"question": "In İstanbul, WHAT?"}, lower_text=True)
    assert text == "user: in i̇stanbul, what?\nbot:"
    assert format_prompt(TEMPLATE, {"question": "In İstanbul?"}, lower_text=False).startswith("User: In İ")


def test_prompt_is_stripped_before_lowering():
    assert format_prompt("  {question}  ", {"question": " A "}, lower_text=True) == "a"


def test_truncation_keeps_the_last_tokens_and_drops_bos(tokenizer):
    text = format_prompt(TEMPLATE, {"question": "why " * 60}, lower_text=True)
    full = [tokenizer.bos_id] + tokenizer.sp.encode(text)
    ids = tokenizer.encode(text, 40)
    assert len(full) > 40 and len(ids) == 40
    assert ids == full[-40:]
    assert ids[0] != tokenizer.bos_id


def test_short_prompt_keeps_bos(tokenizer):
    ids = tokenizer.encode("user: hi\nbot:", 40)
    assert ids[0] == tokenizer.bos_id and len(ids) < 40


def test_missing_prompt_field_is_a_record_error():
    with pytest.raises(RecordError, match="'question'"):
        format_prompt(TEMPLATE, {"image": "x.jpg"}, lower_text=True, index=7)


@pytest.mark.parametrize("left", [True, False])
def test_pad_batch_places_pads_and_mask(left):
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=99, left=left)
    if left:
        assert ids.tolist() == [[5, 6, 7], [99, 99, 8]]
        assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    else:
        assert ids.tolist() == [[5, 6, 7], [8, 99, 99]]
        assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long


# Ids from transformers 4.28.1's slow LlamaTokenizer on the fixture's tokenizer.model, `[PAD]` added as the original
# added it (`add_special_tokens({"pad_token": "[PAD]"})`): ["<s>"] + tokenize(text), then the ids.
SPECIAL_TEXT_IDS = {
    "user: what is <s> this?\nbot:": [1, 326, 931, 303, 272, 904, 1, 904, 331, 926, 13, 920, 295, 931],
    "user: a</s>b<unk>c\nbot:": [1, 326, 931, 263, 2, 269, 0, 270, 13, 920, 295, 931],
    "user: x [PAD] y\nbot:": [1, 326, 931, 904, 932, 1000, 358, 13, 920, 295, 931],
    "user: x[PAD]y  [PAD]\n\nbot:": [1, 326, 931, 904, 932, 1000, 358, 1000, 318, 931],
    "user: <s></s><unk>[PAD]<s>\nbot:": [1, 326, 931, 904, 1, 2, 0, 1000, 1, 904, 13, 920, 295, 931],
    "user: [pad] <S>\nbot:": [1, 326, 931, 747, 919, 767, 962, 904, 973, 944, 974, 13, 920, 295, 931],
    "user: <<s>> [PAD]\t</s>\nbot:": [1, 326, 931, 904, 973, 1, 904, 974, 1000, 2, 904, 13, 920, 295, 931],
}


@pytest.mark.parametrize("text", SPECIAL_TEXT_IDS)
def test_special_token_texts_in_a_prompt_become_their_ids_as_in_the_original(tokenizer, text):
    assert tokenizer.encode(text, 40) == SPECIAL_TEXT_IDS[text]


def test_text_around_special_tokens_is_encoded_piece_by_piece(tokenizer):
    """<s>, </s>, <unk> keep the spaces beside them; [PAD] (added as a plain string) drops them on both sides."""
    sp = tokenizer.sp
    assert tokenizer.encode("user: what is <s> this?\nbot:", 40) == [
        1, *sp.encode("user: what is "), 1, *sp.encode(" this?\nbot:")]
    assert tokenizer.encode("user: x \n[PAD]  y\nbot:", 40) == [
        1, *sp.encode("user: x"), tokenizer.pad_id, *sp.encode("y\nbot:")]


def test_lowered_prompts_keep_special_texts_but_not_pad(tokenizer):
    """Lowering leaves <s>, </s>, <unk> as they are and turns [PAD] into [pad], which is plain text."""
    record = {"question": "Is <s> or [PAD] here?"}
    lowered = tokenizer.encode(format_prompt(TEMPLATE, record, lower_text=True), 40)
    kept = tokenizer.encode(format_prompt(TEMPLATE, record, lower_text=False), 40)
    assert lowered.count(tokenizer.bos_id) == 2 and tokenizer.pad_id not in lowered
    assert kept.count(tokenizer.bos_id) == 2 and kept.count(tokenizer.pad_id) == 1


def test_pad_token_follows_the_sentencepiece_vocabulary(tokenizer):
    assert tokenizer.pad_id == tokenizer.sp.get_piece_size() == 1000
    assert tokenizer.vocab_size == 1001
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (1, 2, 0)


def test_decode_skips_special_tokens_and_strips(tokenizer):
    word = tokenizer.sp.encode("hello")
    assert tokenizer.decode([tokenizer.bos_id, *word, tokenizer.pad_id, tokenizer.eos_id]) == "hello"


@pytest.mark.parametrize("value, got", [(None, "null"), (["a", "b"], "a list"), ({"q": "a"}, "an object"),
                                        (True, "true")])
def test_a_prompt_field_that_is_not_text_is_a_record_error(value, got):
    """The original would ask about "none", "['a', 'b']" or "true": refused, naming the field."""
    with pytest.raises(RecordError) as excinfo:
        format_prompt(TEMPLATE, {"question": value}, lower_text=True, index=9)
    assert excinfo.value.index == 9
    assert excinfo.value.reason == f"'question' must be text or a number, got {got}"
    with pytest.raises(RecordError, match="'dataset' must be text or a number, got null"):
        format_prompt("{dataset}: {question}", {"question": "Why?", "dataset": None}, lower_text=True)


def test_numbers_are_formatted_as_the_original_formats_them():
    assert format_prompt(TEMPLATE, {"question": 42}, lower_text=True) == "user: 42\nbot:"
    assert format_prompt("{question} {index}", {"question": 2.5, "index": 7}, lower_text=False) == "2.5 7"


def test_fields_the_template_does_not_use_are_not_checked():
    assert format_prompt(TEMPLATE, {"question": "Hi", "answer": None, "video": ["x"]}, lower_text=True) == \
        "user: hi\nbot:"


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_prompts_longer_than_max_input_tokens_are_one_warning_naming_the_first(kind, in_fixture, caplog):
    """Lengths as the original counted them (n_tokens_before_truncation of the fixture's meta files)."""
    from configs.schema import config_from_dict
    from conftest import fixture_config
    from dataset.prompt import warn_cut_prompts
    from dataset.records import read_jsonl
    from models.tokenizer import LynxTokenizer

    test_file = f"./data/Open_VQA_{kind}_tiny.jsonl"
    records = read_jsonl(test_file)
    metas = {meta["index"]: meta for meta in map(json.loads, open(FIXTURE / "expected" / f"{kind}_meta.jsonl"))}
    cut = [r for r in records if metas[r.index]["truncated"]]
    first = metas[cut[0].index]
    others = {1: "", 2: "; 1 more record is cut too"}[len(cut)]
    tokenizer = LynxTokenizer.of(config_from_dict(fixture_config()))
    with caplog.at_level(logging.WARNING, logger="lynx"):
        warn_cut_prompts(records, config_from_dict(fixture_config()), tokenizer)
        warn_cut_prompts(records, config_from_dict(fixture_config(max_input_tokens=0)), tokenizer)  # keeps every token
        warn_cut_prompts(records, config_from_dict(fixture_config(
            max_input_tokens=first["n_tokens_before_truncation"] + 200)), tokenizer)
    assert [r.getMessage() for r in caplog.records] == [
        f"record {cut[0].index} ({test_file}:{cut[0].line}): its prompt is {first['n_tokens_before_truncation']} "
        f"tokens and max_input_tokens keeps the last 40, as the original did: its beginning is not seen{others} "
        f"(max_input_tokens: 0 keeps every token)"]
