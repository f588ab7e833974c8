"""Open-VQA scoring: the rules one by one, joining answers to records, reports, the judge and human marks."""

import csv
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import evaluate
from scoring.records import join
from scoring.report import render_markdown
from scoring.rules import gold_alternatives, is_correct, normalise

REPO = Path(__file__).resolve().parent.parent
OPENVQA = REPO / "data"  # the released annotations, kept in the repo (data/README.md)
IMAGE_CLASS_COUNTS = [("OCR", 36, 53), ("Counting", 25, 37), ("Reasoning", 26, 31), ("Place", 17, 22),
                      ("Color", 21, 30), ("Spatial", 9, 15), ("Action", 17, 20), ("Others", 79, 94)]
VIDEO_CLASS_COUNTS = [("Action(Y/N)", 69, 108), ("Others", 29, 40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def record(index, answer, cls="Others", dataset="Open_VQA_images", question="What is it?"):
    return {"dataset": dataset, "question": question, "answer": answer if isinstance(answer, list) else [answer],
            "index": index, "image": f"images/{index}.jpg", "class": cls}


def answer(index, text):
    return {"index": index, "text_output": text}


def run_cli(*args):
    """Run evaluate.py as a user would, in a child process."""
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


# ---------------------------------------------------------------- rules: normalisation

@pytest.mark.parametrize("text, expected", [
    ("Fresh BERRIES", "fresh berries"),                    # lower-case
    ("children's books!", "children s books"),             # punctuation becomes a space
    ("bible stories: with songs & fingerplays", "bible stories with songs fingerplays"),
    ("snake_case", "snake case"),                          # the underscore counts as punctuation
    ("The cat and a dog near an oak", "cat and dog near oak"),  # articles dropped, whole words only
    ("theater another", "theater another"),                # "the"/"an" inside words stay
    ("zero one two ten twenty", "0 1 2 10 20"),            # number words to digits
    ("Twenty-one thirty", "20 1 thirty"),                  # word by word; beyond twenty stays a word
    ("  lots \t of\nspace  ", "lots of space"),            # spaces collapsed
    ("", ""),
])
def test_normalise(text, expected):
    assert normalise(text) == expected


# ---------------------------------------------------------------- rules: gold alternatives

@pytest.mark.parametrize("answers, expected", [
    (["platform or tunnel"], ["platform or tunnel", "platform", "tunnel"]),
    (["lock chamber or pool or pond"], ["lock chamber or pool or pond", "lock chamber", "pool", "pond"]),
    (["doughnuts/donuts"], ["doughnuts donuts", "doughnuts", "donuts"]),
    (["a/b or c"], ["b or c", "b", "c"]),                       # split raw first; "a" normalises to nothing
    (["left or the man in green"], ["left or man in green", "left", "man in green"]),
    (["Two", "2"], ["2"]),                                      # duplicates after normalising kept once
    (["cat", "kitten"], ["cat", "kitten"]),                     # every string of `answer`
    (["The"], []),                                              # an empty alternative would match anything
])
def test_gold_alternatives(answers, expected):
    assert gold_alternatives(answers) == expected


def test_or_splits_only_as_a_word():
    # "Oregon" and "Decorations" contain "or" but are not split there.
    assert gold_alternatives(["Oregon"]) == ["oregon"]
    assert gold_alternatives(["decorations or flowers"]) == ["decorations or flowers", "decorations", "flowers"]


# ---------------------------------------------------------------- rules: yes/no alternatives

@pytest.mark.parametrize("gold, prediction, expected", [
    ("yes", "Yes, it is.", True),
    ("yes", "No.", False),
    ("no", "no", True),
    ("yes", "I think so", False),                      # no yes/no word at all
    ("yes", "There is no dog, yes", False),            # the FIRST yes/no word decides
    ("no", "There is no dog, yes", True),
    ("no", "Nope", False),                             # "nope" is not the word "no"
    ("yes", "yesterday", False),
    ("Yes", "YES!", True),                             # gold is normalised too
])
def test_yes_no_rule(gold, prediction, expected):
    assert is_correct([gold], prediction) is expected


# ---------------------------------------------------------------- rules: whole-word containment

@pytest.mark.parametrize("gold, prediction, expected", [
    ("cat", "A cat sitting on a mat.", True),
    ("cat", "category", False),                        # not inside another word
    ("fresh berries", "It says Fresh Berries!", True),
    ("fresh berries", "berries, fresh", False),        # a sequence, in order
    ("2", "two", True),                                # number word in the prediction
    ("two", "There are 2 dogs.", True),                # number word in the gold
    ("10", "ten", True),
    ("1", "10", False),
    ("the man in green", "a man in green", True),      # articles do not matter
    ("children's books or Picture book", "a picture book", True),
    ("platform or tunnel", "It is a tunnel", True),    # any alternative is enough
    ("platform or tunnel", "a train station", False),
    ("yes or no", "no", True),                         # yes/no parts of a split answer follow the yes/no rule
])
def test_containment_rule(gold, prediction, expected):
    assert is_correct([gold], prediction) is expected


def test_any_gold_string_and_missing_prediction():
    assert is_correct(["cat", "kitten"], "a small kitten") is True
    assert is_correct(["cat", "kitten"], "a dog") is False
    assert is_correct(["cat"], None) is False
    assert is_correct(["the"], "the") is False  # no usable alternative: nothing is right


def test_every_released_gold_answer_matches_itself():
    """Each real gold answer, given back as the prediction, is scored right (450/450 over both files)."""
    checked = 0
    for name in ("Open_VQA_images.jsonl", "Open_VQA_videos.jsonl"):
        for line in (OPENVQA / name).read_text().splitlines():
            row = json.loads(line)
            assert is_correct(row["answer"], row["answer"][0]), row
            checked += 1
    assert checked == 302 + 148


# ---------------------------------------------------------------- joining answers and records

def test_missing_and_extra_answers_are_listed_and_missing_counts_wrong(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat", "A"), record(2, "dog", "A"),
                                                       record(3, "red", "B")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "a cat"), answer(2, "a cat"), answer(99, "x")])
    out = tmp_path / "r.json"
    result = run_cli("--answers", answers, "--annotations", annotations, "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["classes"] == {"A": {"correct": 1, "total": 2}, "B": {"correct": 0, "total": 1}}
    assert report["overall"] == {"correct": 1, "total": 3, "accuracy": 33.33}
    assert report["missing"] == [3]
    assert report["extra"] == [99]
    assert "Missing answers, counted wrong (1): 3" in result.stdout
    assert "Answers with no record, ignored (1): 99" in result.stdout
    verdicts = {row["index"]: row["correct"] for row in report["records"]}
    assert verdicts == {1: True, 2: False, 3: False}


def test_index_written_as_text_matches_a_number(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(7, "cat")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer("7", "cat")])
    sets, extra = join([answers], [annotations])
    assert sets[0].records[0].prediction == "cat" and extra == []


@pytest.mark.parametrize("broken", ["answers", "annotations"])
def test_malformed_line_names_file_and_line(tmp_path, broken):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(2, "dog")])
    target = answers if broken == "answers" else annotations
    lines = target.read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut the line's end: not JSON any more
    target.write_text("\n".join(lines) + "\n")
    result = run_cli("--answers", answers, "--annotations", annotations)
    assert result.returncode == 1
    assert f"{target}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_index_in_annotations_is_an_error(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog"), record(1, "red")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat")])
    result = run_cli("--answers", answers, "--annotations", annotations)
    assert result.returncode == 1
    assert result.stderr == f"error: {annotations}:3: duplicate index 1 (first on line 1)\n"


def test_index_as_number_and_as_text_is_one_index(tmp_path):
    """`1` and `"1"` in one file are the same index (generate.py refuses them alike: see test_records.py)."""
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog"), record("1", "red")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat")])
    result = run_cli("--answers", answers, "--annotations", annotations)
    assert result.returncode == 1
    assert result.stderr == f"error: {annotations}:3: duplicate index '1' (first on line 1, written 1)\n"


def test_duplicate_index_in_answers_is_an_error(tmp_path, capsys):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(1, "dog")])
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations)]) == 1
    assert capsys.readouterr().err == f"error: {answers}:2: duplicate index 1 (first on line 1)\n"


def test_index_answered_in_two_shards_names_both_files(tmp_path, capsys):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog")])
    shard_0 = write_jsonl(tmp_path / "r0.jsonl", [answer(1, "cat"), answer(2, "dog")])
    shard_1 = write_jsonl(tmp_path / "r1.jsonl", [answer("2", "dog")])
    assert evaluate.main(["--answers", str(shard_0), str(shard_1), "--annotations", str(annotations)]) == 1
    assert capsys.readouterr().err == f"error: {shard_1}:1: duplicate index '2' (first on {shard_0}:2, written 2)\n"


@pytest.mark.parametrize("line, problem", [
    ({"text_output": "cat"}, "record has no 'index'"),
    ({"index": 1.0, "text_output": "cat"}, "'index' must be an integer or a string, got 1.0"),
    ({"index": True, "text_output": "cat"}, "'index' must be an integer or a string, got True"),
    ({"index": 2}, "an answer needs 'text_output', a string"),
    ({"index": 2, "text_output": None}, "an answer needs 'text_output', a string"),
])
def test_bad_answer_line_names_file_and_line(tmp_path, capsys, line, problem):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), line])
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations)]) == 1
    assert capsys.readouterr().err == f"error: {answers}:2: {problem}\n"


# ---------------------------------------------------------------- the wrong pair of files

def test_answers_sharing_no_index_are_an_error(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(7, "cat"), answer(8, "dog")])
    out = tmp_path / "r.json"
    result = run_cli("--answers", answers, "--annotations", annotations, "--json", out)
    assert result.returncode == 1
    assert result.stderr == (f"error: {answers} and {annotations} share no index: these answers are not for these "
                             f"records (check the pair of files, and their order)\n")
    assert result.stdout == "" and not out.exists()


def test_pooled_answers_sharing_no_index_are_an_error(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", [record(1, "cat", dataset="set_a")])
    second = write_jsonl(tmp_path / "b.jsonl", [record(2, "dog", dataset="set_b")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(3, "cat")])
    assert evaluate.main(["--answers", str(answers), "--annotations", str(first), str(second)]) == 1
    assert capsys.readouterr().err == (f"error: {answers} and {first} {second} share no index: these answers are "
                                       f"not for these records (check the pair of files, and their order)\n")


def test_empty_answers_file_is_an_error(tmp_path, capsys):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [])
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations)]) == 1
    assert capsys.readouterr().err == (f"error: {answers}: holds no answers (scoring it against {annotations} "
                                       f"would give 0)\n")


def test_empty_annotation_file_is_an_error(tmp_path, capsys):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat")])
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations)]) == 1
    assert capsys.readouterr().err == f"error: {annotations}: holds no records\n"


def test_few_answered_records_give_a_warning(tmp_path):
    """Fewer than half of the records answered: scored (the rest count wrong), with a warning on stderr."""
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(i, "cat") for i in range(1, 6)])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(2, "cat")])
    out = tmp_path / "r.json"
    result = run_cli("--answers", answers, "--annotations", annotations, "--json", out)
    assert result.returncode == 0
    line = (f"only 2 of the 5 records of {annotations} have an answer in {answers} (fewer than 50%); the other 3 "
            f"count as wrong")
    assert result.stderr == f"warning: {line}\n"
    report = json.loads(out.read_text())
    assert report["warnings"] == [line] and report["sets"][0]["warnings"] == [line]
    assert report["overall"] == {"correct": 2, "total": 5, "accuracy": 40.0}


def test_half_answered_gives_no_warning(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(i, "cat") for i in range(1, 5)])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(2, "cat")])
    result = run_cli("--answers", answers, "--annotations", annotations)
    assert result.returncode == 0 and result.stderr == ""


def test_answers_of_another_set_with_overlapping_indices_give_a_warning(tmp_path):
    """The image answers (1..6) scored against the video annotations (1..2): every video record is answered,
    but most answers have no record."""
    videos = write_jsonl(tmp_path / "vid.jsonl", [record(1, "yes", dataset="Open_VQA_videos"),
                                                  record(2, "no", dataset="Open_VQA_videos")])
    image_answers = write_jsonl(tmp_path / "a_img.jsonl", [answer(i, "cat") for i in range(1, 7)])
    result = run_cli("--answers", image_answers, "--annotations", videos)
    assert result.returncode == 0
    assert result.stderr == (f"warning: only 2 of the 6 answers in {image_answers} have a record in {videos} "
                             f"(fewer than 50%); the other 4 are ignored\n")


def test_missing_file_is_a_one_line_error(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat")])
    result = run_cli("--answers", tmp_path / "nope.jsonl", "--annotations", annotations)
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "nope.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_annotation_files_pair_with_answers_by_position(tmp_path):
    """Images and videos both number from 1: answers[i] goes with annotations[i]."""
    images = write_jsonl(tmp_path / "img.jsonl", [record(1, "cat", "Color"), record(2, "dog", "Others")])
    videos = write_jsonl(tmp_path / "vid.jsonl", [record(1, "yes", "Action(Y/N)", "Open_VQA_videos"),
                                                  record(2, "onion", "Others", "Open_VQA_videos")])
    image_answers = write_jsonl(tmp_path / "a_img.jsonl", [answer(1, "cat"), answer(2, "cat")])
    video_answers = write_jsonl(tmp_path / "a_vid.jsonl", [answer(1, "yes"), answer(2, "onion"), answer(3, "x")])
    report = evaluate.evaluate([image_answers, video_answers], [images, videos])
    assert report["classes"] == {"Color": {"correct": 1, "total": 1}, "Others": {"correct": 1, "total": 2},
                                 "Action(Y/N)": {"correct": 1, "total": 1}}
    assert report["overall"] == {"correct": 3, "total": 4, "accuracy": 75.0}
    images_set, videos_set = report["sets"]
    assert images_set["name"] == "Open_VQA_images" and videos_set["name"] == "Open_VQA_videos"
    assert images_set["overall"]["correct"] == 1 and videos_set["overall"]["correct"] == 2
    assert videos_set["extra"] == [3] and report["extra"] == [3]


def test_one_answers_file_for_colliding_annotation_files_is_an_error(tmp_path):
    images = write_jsonl(tmp_path / "img.jsonl", [record(1, "cat")])
    videos = write_jsonl(tmp_path / "vid.jsonl", [record(1, "yes", dataset="Open_VQA_videos")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat")])
    result = run_cli("--answers", answers, "--annotations", images, videos)
    assert result.returncode == 1
    assert "give one answers file per annotation file" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_answers_file_for_disjoint_annotation_files_is_pooled(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [record(1, "cat", "A", "set_a")])
    second = write_jsonl(tmp_path / "b.jsonl", [record(2, "dog", "B", "set_b")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(2, "cat"), answer(5, "x")])
    report = evaluate.evaluate([answers], [first, second])
    assert [s["overall"]["correct"] for s in report["sets"]] == [1, 0]
    assert report["extra"] == [5]


def test_sharded_answers_join_one_annotation_file(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat"), record(2, "dog"), record(3, "red")])
    shard_0 = write_jsonl(tmp_path / "r0.jsonl", [answer(1, "cat"), answer(3, "red")])
    shard_1 = write_jsonl(tmp_path / "r1.jsonl", [answer(2, "dog")])
    report = evaluate.evaluate([shard_0, shard_1], [annotations])
    assert report["overall"] == {"correct": 3, "total": 3, "accuracy": 100.0}


# ---------------------------------------------------------------- reports in the paper's layout

def paper_shaped_files(tmp_path, name, dataset, class_counts):
    """Annotations with the paper's class totals and answers right exactly as often as the paper's Lynx."""
    rows, answers, index = [], [], 1
    for cls, correct, total in class_counts:
        for k in range(total):
            rows.append(record(index, "cat", cls, dataset))
            answers.append(answer(index, "a cat" if k < correct else "a dog"))
            index += 1
    return (write_jsonl(tmp_path / f"ans_{name}.jsonl", answers),
            write_jsonl(tmp_path / f"{name}.jsonl", rows))


def test_report_reproduces_the_paper_rows(tmp_path):
    image_answers, images = paper_shaped_files(tmp_path, "img", "Open_VQA_images", IMAGE_CLASS_COUNTS)
    video_answers, videos = paper_shaped_files(tmp_path, "vid", "Open_VQA_videos", VIDEO_CLASS_COUNTS)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    result = run_cli("--answers", image_answers, video_answers, "--annotations", images, videos,
                     "--json", out_json, "--markdown", out_md)
    assert result.returncode == 0, result.stderr
    report = json.loads(out_json.read_text())
    images_set, videos_set = report["sets"]
    assert images_set["classes"] == {cls: {"correct": c, "total": t} for cls, c, t in IMAGE_CLASS_COUNTS}
    assert images_set["overall"] == {"correct": 230, "total": 302, "accuracy": 76.16}
    assert videos_set["overall"] == {"correct": 98, "total": 148, "accuracy": 66.22}
    # Both sets together: Others = 79 + 29 of 94 + 40; overall 328/450 = 72.888... %
    assert report["classes"]["Others"] == {"correct": 108, "total": 134}
    assert report["overall"] == {"correct": 328, "total": 450, "accuracy": 72.89}
    markdown = out_md.read_text()
    assert markdown == result.stdout  # the file holds what was printed
    assert ("|  | OCR /53 | Count /37 | Reason /31 | Place /22 | Color /30 | Spatial /15 | Action /20 | "
            "Others /94 | Overall |") in markdown
    assert "| this run (rule) | 36 | 25 | 26 | 17 | 21 | 9 | 17 | 79 | 76.16 (230/302) |" in markdown
    assert "| paper, Lynx | 36 | 25 | 26 | 17 | 21 | 9 | 17 | 79 | 76.16 (230/302) |" in markdown
    assert "|  | Action(Y/N) /108 | Others /40 | Overall |" in markdown
    assert "| this run (rule) | 69 | 29 | 66.22 (98/148) |" in markdown
    assert "| paper, Lynx | 69 | 29 | 66.22 (98/148) |" in markdown


def test_paper_row_shows_its_own_totals_when_the_run_covers_other_records(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat", "OCR"), record(2, "dog", "OCR")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(2, "cat")])
    markdown = render_markdown(evaluate.evaluate([answers], [annotations]))
    assert "| this run (rule) | 1 | 50.00 (1/2) |" in markdown
    assert "| paper, Lynx | 36/53 | 76.16 (230/302) |" in markdown


def test_chart_is_a_png_and_matplotlib_is_loaded_only_for_it(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [record(1, "cat", "OCR"), record(2, "dog", "Color")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "cat"), answer(2, "cat")])
    chart = tmp_path / "chart.png"
    probe = ("import sys, evaluate; evaluate.main(sys.argv[1:]); "
             "print('matplotlib' in sys.modules, 'torch' in sys.modules)")
    without = subprocess.run([sys.executable, "-c", probe, "--answers", str(answers),
                              "--annotations", str(annotations)], capture_output=True, text=True, cwd=REPO)
    assert without.stdout.strip().splitlines()[-1] == "False False"
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations), "--chart", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(chart) as image:
        assert image.width > 300 and image.height > 200


# ---------------------------------------------------------------- judge

class JudgeServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 that records every request and replies from a table. `statuses`:
    the status of each request in turn (200 once they run out); `failing`: predictions always answered 500;
    `delay`: seconds each answer takes. Errors carry OpenAI's `retry-after-ms`, so the client's retries are quick."""

    def __init__(self, replies, status=200, statuses=(), failing=(), delay=0.0):
        self.requests, self.replies, self.status = [], replies, status
        self.statuses, self.failing, self.delay = list(statuses), set(failing), delay
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    owner.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                           "body": body})
                    status = owner.statuses.pop(0) if owner.statuses else owner.status
                    owner.in_flight += 1
                    owner.most_in_flight = max(owner.most_in_flight, owner.in_flight)
                time.sleep(owner.delay)
                prompt = body["messages"][0]["content"]
                prediction, reply = next((p, text) for p, text in owner.replies.items() if p in prompt)
                if prediction in owner.failing:
                    status = 500
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}
                                     if status == 200 else {"error": {"message": f"status {status}"}})
                with lock:
                    owner.in_flight -= 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status != 200:
                    self.send_header("retry-after-ms", "10")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_env(monkeypatch):
    for name in ("LYNX_JUDGE_API_KEY", "OPENAI_API_KEY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LYNX_JUDGE_API_KEY", "test-key")


JUDGE_REPLIES = {"a dark tunnel": "Correct. A tunnel is listed.", "snow white horse": "yes",
                 "a train station": "Incorrect, the reference says no.", "hmm": "I cannot tell."}


def judge_files(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [
        record(1, "platform or tunnel", "Place", question="What is in the image?"),
        record(2, "white", "Color", question="What color is the horse?"),
        record(3, "no", "Reasoning", question="Is this dog driving the bus?"),
        record(4, "cat", "Others"),
        record(5, "dog", "Others"),
    ])
    answers = write_jsonl(tmp_path / "result.jsonl", [answer(1, "a dark tunnel"), answer(2, "snow white horse"),
                                                      answer(3, "a train station"), answer(5, "hmm")])
    return answers, annotations


def test_judge_asks_once_per_answer_and_reruns_from_the_cache(tmp_path, judge_env):
    server = JudgeServer(JUDGE_REPLIES)
    answers, annotations = judge_files(tmp_path)
    argv = ["--judge", "--judge-url", server.url, "--judge-model", "judge-x",
            "--answers", str(answers), "--annotations", str(annotations), "--json", str(tmp_path / "r.json")]
    try:
        assert evaluate.main(argv) == 0
        first = json.loads((tmp_path / "r.json").read_text())
        # One request per record with an answer (record 4 has none), sent as an OpenAI chat completion.
        assert len(server.requests) == 4
        for request in server.requests:
            assert request["path"] == "/v1/chat/completions"
            assert request["authorization"] == "Bearer test-key"
            assert request["body"]["model"] == "judge-x"
            assert request["body"]["temperature"] == 0
        prompts = [request["body"]["messages"][0]["content"] for request in server.requests]  # asked 4 at once
        prompt = next(p for p in prompts if "Question: What is in the image?" in p)
        assert "Reference answer: platform or tunnel" in prompt
        assert "Model's answer: a dark tunnel" in prompt
        assert prompt.startswith((REPO / "scoring" / "judge_prompt.txt").read_text()[:60])
        verdicts = {row["index"]: row["correct"] for row in first["records"]}
        assert verdicts == {1: True, 2: True, 3: False, 4: False, 5: False}
        assert first["overall"] == {"correct": 2, "total": 5, "accuracy": 40.0}
        assert first["missing"] == [4]
        assert first["judge"]["requests"] == 4 and first["judge"]["unparsed"] == [["Open_VQA_images", 5]]
        # The default cache sits beside the answers file and holds each raw reply.
        cache = [json.loads(line) for line in (tmp_path / "result.judge.jsonl").read_text().splitlines()]
        assert sorted((entry["index"], entry["reply"], entry["verdict"]) for entry in cache) == [
            (1, "Correct. A tunnel is listed.", True), (2, "yes", True),
            (3, "Incorrect, the reference says no.", False), (5, "I cannot tell.", None)]
        assert all(entry["model"] == "judge-x" and len(entry["prompt_sha256"]) == 64 for entry in cache)

        # A rerun makes no request and gives the same verdicts.
        server.requests.clear()
        assert evaluate.main(argv) == 0
        assert server.requests == []
        second = json.loads((tmp_path / "r.json").read_text())
        assert second["records"] == first["records"] and second["judge"]["cached"] == 4

        # A changed prediction is asked again, alone; so is everything for another model.
        write_jsonl(answers, [answer(1, "a dark tunnel"), answer(2, "snow white horse"),
                              answer(3, "a train station"), answer(5, "a train station")])
        assert evaluate.main(argv) == 0
        assert len(server.requests) == 1 and "Model's answer: a train station" in \
            server.requests[0]["body"]["messages"][0]["content"]
        server.requests.clear()
        assert evaluate.main([*argv, "--judge-model", "judge-y"]) == 0
        assert len(server.requests) == 4
    finally:
        server.close()


def test_judge_takes_a_full_url_an_explicit_cache_and_the_openai_key(tmp_path, judge_env, monkeypatch):
    monkeypatch.delenv("LYNX_JUDGE_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    server = JudgeServer(JUDGE_REPLIES)
    answers, annotations = judge_files(tmp_path)
    cache = tmp_path / "cache" / "verdicts.jsonl"
    try:
        assert evaluate.main(["--judge", "--judge-url", server.url + "/chat/completions/", "--judge-model", "m",
                              "--judge-cache", str(cache), "--answers", str(answers),
                              "--annotations", str(annotations)]) == 0
        assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
        assert {r["authorization"] for r in server.requests} == {"Bearer openai-key"}
        assert len(cache.read_text().splitlines()) == 4
        assert not (tmp_path / "result.judge.jsonl").exists()
    finally:
        server.close()


def test_judge_http_error_is_a_one_line_error(tmp_path, judge_env):
    server = JudgeServer(JUDGE_REPLIES, status=500)
    answers, annotations = judge_files(tmp_path)
    try:
        result = run_cli("--judge", "--judge-url", server.url, "--judge-model", "m", "--judge-concurrency", "1",
                         "--judge-retries", "2", "--answers", answers, "--annotations", annotations)
    finally:
        server.close()
    assert result.returncode == 1
    assert "HTTP 500" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(server.requests) in (3, 6)  # a question tried 1 + 2 times (and one the worker had begun); no more


def test_judge_retries_a_rate_limit_then_answers(tmp_path, judge_env):
    """429 twice, then 200: the client waits and asks again; every verdict arrives, none is lost or doubled."""
    server = JudgeServer(JUDGE_REPLIES, statuses=[429, 429])
    answers, annotations = judge_files(tmp_path)
    try:
        assert evaluate.main(["--judge", "--judge-url", server.url, "--judge-model", "m", "--judge-concurrency", "1",
                              "--answers", str(answers), "--annotations", str(annotations),
                              "--json", str(tmp_path / "r.json")]) == 0
    finally:
        server.close()
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(server.requests) == 4 + 2 and report["judge"]["requests"] == 4
    assert {row["index"]: row["correct"] for row in report["records"]} == {1: True, 2: True, 3: False, 4: False,
                                                                           5: False}
    assert len((tmp_path / "result.judge.jsonl").read_text().splitlines()) == 4


def test_judge_asks_a_few_at_a_time_and_a_rerun_resumes_after_a_failure(tmp_path, judge_env):
    """Questions go out at most --judge-concurrency at once. One that fails even after its retries ends the run in
    one line, but the verdicts that arrived are kept, and the same command asks only for the missing one."""
    answers, annotations = judge_files(tmp_path)
    argv = ["--judge", "--judge-model", "m", "--judge-concurrency", "2", "--judge-retries", "1",
            "--answers", str(answers), "--annotations", str(annotations), "--json", str(tmp_path / "r.json")]
    server = JudgeServer(JUDGE_REPLIES, failing=["hmm"], delay=0.2)
    try:
        assert evaluate.main(["--judge-url", server.url, *argv]) == 1
        assert server.most_in_flight == 2
    finally:
        server.close()
    kept = [json.loads(line)["index"] for line in (tmp_path / "result.judge.jsonl").read_text().splitlines()]
    assert sorted(kept) == [1, 2, 3]  # record 5's question failed; the others were answered and kept
    server = JudgeServer(JUDGE_REPLIES)
    try:
        assert evaluate.main(["--judge-url", server.url, *argv]) == 0
    finally:
        server.close()
    assert len(server.requests) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["judge"]["cached"] == 3 and report["judge"]["unparsed"] == [["Open_VQA_images", 5]]


def test_judge_needs_a_model(tmp_path):
    answers, annotations = judge_files(tmp_path)
    result = run_cli("--judge", "--answers", answers, "--annotations", annotations)
    assert result.returncode == 2 and "--judge-model" in result.stderr


# ---------------------------------------------------------------- human marks

def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def human_files(tmp_path):
    annotations = write_jsonl(tmp_path / "ann.jsonl", [
        record(1, "platform or tunnel", "Place"), record(2, "white", "Color"), record(3, "cat", "Others")])
    answers = write_jsonl(tmp_path / "ans.jsonl", [answer(1, "a dark tunnel"), answer(2, "ivory, with\nspots")])
    return answers, annotations


def test_export_csv_is_prefilled_with_the_rule_verdicts(tmp_path):
    answers, annotations = human_files(tmp_path)
    sheet = tmp_path / "marks.csv"
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations),
                          "--export-csv", str(sheet)]) == 0
    rows = read_csv(sheet)
    assert list(rows[0]) == ["dataset", "index", "class", "question", "gold_answers", "prediction", "correct"]
    assert [(r["index"], r["class"], r["gold_answers"], r["prediction"], r["correct"]) for r in rows] == [
        ("1", "Place", "platform or tunnel", "a dark tunnel", "1"),
        ("2", "Color", "white", "ivory, with\nspots", "0"),
        ("3", "Others", "cat", "", "0")]
    assert evaluate.main(["--answers", str(answers), "--annotations", str(annotations),
                          "--export-csv", str(sheet), "--export-blank"]) == 0
    assert [r["correct"] for r in read_csv(sheet)] == ["", "", ""]


def test_human_marks_are_scored(tmp_path):
    answers, annotations = human_files(tmp_path)
    sheet, out = tmp_path / "marks.csv", tmp_path / "r.json"
    evaluate.main(["--answers", str(answers), "--annotations", str(annotations), "--export-csv", str(sheet)])
    rows = read_csv(sheet)
    rows[1]["correct"] = "yes"   # a person accepts "ivory" for white
    rows[2]["correct"] = "1"     # a mark on a missing answer cannot make it right
    write_csv(sheet, rows)
    assert evaluate.main(["--human-csv", str(sheet), "--answers", str(answers), "--annotations", str(annotations),
                          "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["scoring"] == "human"
    assert report["classes"] == {"Color": {"correct": 1, "total": 1}, "Others": {"correct": 0, "total": 1},
                                 "Place": {"correct": 1, "total": 1}}
    assert report["overall"] == {"correct": 2, "total": 3, "accuracy": 66.67}


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[0].update(correct=""), "marks.csv:2: not marked"),
    (lambda rows: rows[1].update(correct="maybe"), "cannot read the mark 'maybe'"),
    (lambda rows: rows[0].update(prediction="something else"), "marks.csv:2: the prediction differs"),
    (lambda rows: rows.pop(), "1 record(s) have no row: Open_VQA_images:3"),
])
def test_human_csv_problems_are_errors(tmp_path, edit, message):
    answers, annotations = human_files(tmp_path)
    sheet = tmp_path / "marks.csv"
    evaluate.main(["--answers", str(answers), "--annotations", str(annotations), "--export-csv", str(sheet)])
    rows = read_csv(sheet)
    edit(rows)
    write_csv(sheet, rows)
    result = run_cli("--human-csv", sheet, "--answers", answers, "--annotations", annotations)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
