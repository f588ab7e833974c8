"""MME: converting a release folder of both layouts, reading replies, and acc / acc+ / perception / cognition."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import evaluate
from errors import InputError
from scoring.mme import convert_mme, mme_reply

REPO = Path(__file__).resolve().parent.parent


def tiny_image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), color).save(path)


def write_questions(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{question}\t{answer}\n" for question, answer in lines), encoding="utf-8")


def make_mme(root):
    """A small MME release: existence and code_reasoning side by side, artwork in images/ + questions_answer_YN/."""
    tiny_image(root / "existence" / "a.jpg", "red")
    write_questions(root / "existence" / "a.txt", [("Is there a dog in this image? Please answer yes or no.", "Yes"),
                                                   ("Is there a cat in this image? Please answer yes or no.", "No")])
    tiny_image(root / "existence" / "b.png", "blue")
    write_questions(root / "existence" / "b.txt", [("Is there a car?", "Yes"), ("Is there a bus?", "No")])
    for name, color in (("x", "green"), ("y", "white")):
        tiny_image(root / "artwork" / "images" / f"{name}.jpg", color)
        write_questions(root / "artwork" / "questions_answer_YN" / f"{name}.txt",
                        [(f"Is {name} by Monet?", "Yes"), (f"Is {name} by Dali?", "No")])
    tiny_image(root / "code_reasoning" / "z.png", "black")
    write_questions(root / "code_reasoning" / "z.txt", [("Does it print 3?", "Yes"), ("Does it print 4?", "No")])
    (root / "eval_tool").mkdir()
    (root / "eval_tool" / "readme.txt").write_text("not a category\n")
    return root


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_convert_both_layouts(tmp_path):
    root = make_mme(tmp_path / "MME")
    out = tmp_path / "data" / "MME.jsonl"
    count, skipped = convert_mme(root, out)
    records = read_jsonl(out)
    assert count == len(records) == 10
    assert skipped == ["eval_tool"]
    assert [r["index"] for r in records] == list(range(10))
    # Categories in name order, images in name order, questions in file order.
    assert [(r["class"], r["image_id"], r["answer"]) for r in records] == [
        ("artwork", "artwork/x.jpg", ["Yes"]), ("artwork", "artwork/x.jpg", ["No"]),
        ("artwork", "artwork/y.jpg", ["Yes"]), ("artwork", "artwork/y.jpg", ["No"]),
        ("code_reasoning", "code_reasoning/z.png", ["Yes"]), ("code_reasoning", "code_reasoning/z.png", ["No"]),
        ("existence", "existence/a.jpg", ["Yes"]), ("existence", "existence/a.jpg", ["No"]),
        ("existence", "existence/b.png", ["Yes"]), ("existence", "existence/b.png", ["No"])]
    first = records[6]
    assert first["question"] == "Is there a dog in this image? Please answer yes or no."
    assert first["dataset"] == "MME"
    assert first["image"] == str(root / "existence" / "a.jpg")
    assert records[0]["image"] == str(root / "artwork" / "images" / "x.jpg")
    assert all(Path(r["image"]).is_file() for r in records)


def test_convert_cli(tmp_path):
    root = make_mme(tmp_path / "MME")
    out = tmp_path / "MME.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--mme-convert", str(root), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"wrote 10 MME questions to {out}" in result.stdout
    assert "eval_tool" in result.stderr
    assert len(read_jsonl(out)) == 10


def test_convert_errors_name_the_file(tmp_path):
    root = make_mme(tmp_path / "MME")
    bad = root / "existence" / "b.txt"
    bad.write_text("Is there a car?\tYes\nIs there a bus? Maybe\n")
    with pytest.raises(InputError, match=r"b\.txt:2: expected 'question<TAB>Yes\|No'"):
        convert_mme(root, tmp_path / "out.jsonl")
    bad.write_text("Is there a car?\tYes\n")
    (root / "existence" / "b.png").unlink()
    with pytest.raises(InputError, match=r"b\.txt: no image named b"):
        convert_mme(root, tmp_path / "out.jsonl")
    with pytest.raises(InputError, match="no MME category folder"):
        convert_mme(root / "eval_tool", tmp_path / "out.jsonl")


@pytest.mark.parametrize("reply, expected", [
    ("Yes", "yes"), ("yes.", "yes"), (" No. ", "no"),
    ("Y.E.S.", "yes"),                  # dots are removed before reading
    ("Yes, there is a dog.", "yes"),    # "yes" within the first 4 characters
    ("No, there is not.", "no"),
    ("none", "no"),                      # "no" within the first 4 characters, as MME's own tool reads it
    ("The answer is yes", "other"),      # the first 4 characters are "the "
    ("I don't know", "other"),
    ("", "other"),
    (None, "other"),                     # a missing answer
])
def test_mme_reply(reply, expected):
    assert mme_reply(reply) == expected


def test_mme_scores(tmp_path):
    root = make_mme(tmp_path / "MME")
    annotations = tmp_path / "MME.jsonl"
    convert_mme(root, annotations)
    predictions = {
        # artwork: x both right; y both wrong → acc 2/4 = 50, acc+ 1/2 = 50, score 100
        0: "Yes", 1: "nope", 2: "No.", 3: "yes",
        # code_reasoning: index 4 missing (wrong), 5 right → acc 1/2 = 50, acc+ 0/1 = 0, score 50
        5: "NO.",
        # existence: a both right, b one wrong → acc 3/4 = 75, acc+ 1/2 = 50, score 125
        6: "Yes.", 7: "No", 8: "yes, there is", 9: "There is none",
    }
    answers = tmp_path / "result_mme.jsonl"
    answers.write_text("".join(json.dumps({"index": i, "text_output": t}) + "\n" for i, t in predictions.items()))
    out = tmp_path / "mme.json"
    assert evaluate.main(["--mme", "--answers", str(answers), "--annotations", str(annotations),
                          "--json", str(out), "--markdown", str(tmp_path / "mme.md")]) == 0
    report = json.loads(out.read_text())
    assert report["mme"] == {
        "artwork": {"acc": 50.0, "acc_plus": 50.0, "score": 100.0},
        "code_reasoning": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0},
        "existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
        "perception": 225.0,   # existence + artwork
        "cognition": 50.0,     # code_reasoning
    }
    # MME's order: perception categories, then cognition, then the sums.
    assert list(report["mme"]) == ["existence", "artwork", "code_reasoning", "perception", "cognition"]
    assert report["classes"] == {"artwork": {"correct": 2, "total": 4},
                                 "code_reasoning": {"correct": 1, "total": 2},
                                 "existence": {"correct": 3, "total": 4}}
    assert report["overall"] == {"correct": 6, "total": 10, "accuracy": 60.0}
    assert report["missing"] == [4]
    markdown = (tmp_path / "mme.md").read_text()
    assert "| existence | 75.00 | 50.00 | 125.00 |" in markdown
    assert "| perception | 225.00 | 1373.23 |" in markdown
    assert "| cognition | 50.00 | 215.71 |" in markdown


def test_mme_scoring_needs_yes_no_gold(tmp_path):
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text(json.dumps({"index": 0, "question": "q", "answer": ["maybe"], "class": "count",
                                       "image": "x.jpg"}) + "\n")
    answers = tmp_path / "ans.jsonl"
    answers.write_text(json.dumps({"index": 0, "text_output": "yes"}) + "\n")
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--mme", "--answers", str(answers),
                             "--annotations", str(annotations)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert f"{annotations}:1: an MME record needs one answer, Yes or No" in result.stderr


def test_mme_config_is_the_lynx_config_with_the_mme_test_file():
    from configs import load_config

    lynx, mme = load_config(str(REPO / "configs" / "LYNX.yaml")), load_config(str(REPO / "configs" / "MME.yaml"))
    lynx_values, mme_values = lynx.to_dict(), mme.to_dict()
    assert mme_values["test_files"] == ["./data/MME.jsonl"]
    assert mme_values["vision_prompt_dict"] == "image" and mme_values["prompt"] == "User: {question}\nBot:"
    assert {key for key in lynx_values if lynx_values[key] != mme_values[key]} == {"test_files"}
