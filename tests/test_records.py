"""Test files and annotation files follow one index rule (dataset.records), with messages naming file:line."""
import json

import pytest

from conftest import ROOT
from dataset.records import read_jsonl, read_test_files
from errors import InputError
from scoring.records import read_annotations


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def row(index, **fields):
    return {"index": index, "image": "images/a.jpg", "question": "q", "answer": ["a"], **fields}


def error_of(read, path):
    with pytest.raises(InputError) as err:
        read(str(path))
    return str(err.value)


@pytest.mark.parametrize("rows, line, problem", [
    ([row(1), row(2), row(1)], 3, "duplicate index 1 (first on line 1)"),
    ([row(1), row(2), row("1")], 3, "duplicate index '1' (first on line 1, written 1)"),
    ([row("17"), "", row(17)], 3, "duplicate index 17 (first on line 1, written '17')"),
    ([row(1), {"image": "images/a.jpg", "question": "q", "answer": "a"}], 2, "record has no 'index'"),
    ([row(1), row(2.0)], 2, "'index' must be an integer or a string, got 2.0"),
    ([row(1), row(None)], 2, "'index' must be an integer or a string, got None"),
    ([row(False)], 1, "'index' must be an integer or a string, got False"),
    ([row(1), row([1])], 2, "'index' must be an integer or a string, got [1]"),
])
def test_generate_and_evaluate_read_indices_alike(tmp_path, rows, line, problem):
    """The same file is refused by generate.py's reader and evaluate.py's with the very same message."""
    path = write_lines(tmp_path / "test.jsonl", rows)
    expected = f"{path}:{line}: {problem}"
    assert error_of(read_jsonl, path) == expected
    assert error_of(read_annotations, path) == expected


def test_indices_repeat_across_test_files():
    """Open_VQA_images and Open_VQA_videos both number from 1: a repeat in another test file is no duplicate."""
    records = read_test_files([str(ROOT / "data" / "Open_VQA_images.jsonl"),
                               str(ROOT / "data" / "Open_VQA_videos.jsonl")])
    assert len(records) == 302 + 148
    assert [r.index for r in records].count(1) == 2


def test_text_and_number_indices_are_kept_as_written(tmp_path):
    path = write_lines(tmp_path / "test.jsonl", [row("a-1"), row(2)])
    assert [r.index for r in read_jsonl(str(path))] == ["a-1", 2]


@pytest.mark.parametrize("text, line, problem", [
    ('{"index": 1, "image": "images/a.jpg" "question": "q"}\n', 1, "Expecting ',' delimiter (column 38)"),
    ('{"index": 1, "question": "héllo wörld" "image": "a.jpg"}\n', 1, "Expecting ',' delimiter (column 40)"),
    ('{"index": 1, "image": "images/a.jpg", "question": "q"\n{"index": 2}\n', 1,
     "Expecting ',' delimiter (at the end of the line)"),
    ('{"index": 1, "image": "images/a.jpg",\r\n', 1, "Expecting property name enclosed in double quotes (at the end of "
                                                     "the line)"),
])
def test_bad_json_is_placed_at_its_column_in_characters(tmp_path, text, line, problem):
    """Each line is parsed without its line break: an error at the end was placed at column 1 of a next line."""
    path = tmp_path / "test.jsonl"
    path.write_bytes(text.encode())
    assert error_of(read_jsonl, path) == f"{path}:{line}: not valid JSON: {problem}"
    column = problem.partition("(column ")[2].rstrip(")")
    if column:  # the column points at the character the parser stopped at: the quote a comma should precede
        assert text.splitlines()[line - 1][int(column) - 1] == '"'


def test_a_byte_order_mark_is_skipped(tmp_path):
    """What an editor saving "UTF-8 with BOM" writes, first in the file and, once such files are joined, inside
    (evaluate.py's reader is the same function)."""
    path = tmp_path / "test.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row(1)).encode() + b"\n\xef\xbb\xbf" + json.dumps(row(2)).encode())
    assert [r.fields for r in read_jsonl(str(path))] == [row(1), row(2)]
