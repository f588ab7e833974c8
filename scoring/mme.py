"""MME: converting the official release folder to a jsonl for generate.py, and MME's own scoring.

MME asks two yes/no questions per image. A category's score is acc (per question) + acc+ (per image, all of
its questions right), each in percent, so at most 200; perception and cognition are sums of category scores.
"""

import json
from pathlib import Path

from errors import InputError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_LAYOUT = ("images", "questions_answer_YN")  # the other layout keeps image and .txt side by side


def find_image(folder, stem, txt_path):
    for candidate in sorted(folder.glob(f"{stem}.*")):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    raise InputError(f"{txt_path}: no image named {stem}.jpg/.png in {folder}")


def read_questions(txt_path):
    """The (question, "Yes"|"No") lines of one MME .txt file."""
    questions = []
    for number, line in enumerate(txt_path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        question, tab, answer = line.rstrip().rpartition("\t")
        if not tab or answer.strip().lower() not in ("yes", "no"):
            raise InputError(f"{txt_path}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
        questions.append((question.strip(), answer.strip().capitalize()))
    return questions


def convert_mme(root, out_path):
    """Write one jsonl record per MME question; return (record count, skipped folder names).

    Image paths are written as `root/...` as given, because generate.py opens media relative to the
    working directory: run it from where the conversion ran, or give an absolute root.
    Folders that are not MME categories (e.g. eval_tool) are skipped and reported.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (give the MME release folder holding the category folders)")
    records, skipped = [], []
    for category_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        category = category_dir.name
        if category not in PERCEPTION + COGNITION:
            skipped.append(category)
            continue
        images_dir, texts_dir = (category_dir / name for name in SPLIT_LAYOUT)
        if not texts_dir.is_dir():
            images_dir = texts_dir = category_dir
        for txt_path in sorted(texts_dir.glob("*.txt")):
            image = find_image(images_dir, txt_path.stem, txt_path)
            for question, answer in read_questions(txt_path):
                records.append({"index": len(records), "image": str(image), "question": question,
                                "answer": [answer], "class": category, "dataset": "MME",
                                "image_id": f"{category}/{image.name}"})
    if not records:
        raise InputError(f"{root}: no MME category folder with questions found")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records), skipped


def category_rank(category):
    """Sort key: MME's own order (perception, then cognition), then any other category by name."""
    order = PERCEPTION + COGNITION
    return (order.index(category), "") if category in order else (len(order), category)


def mme_reply(text):
    """MME's reading of a reply: "yes", "no" or "other" (lower-cased, "." removed, then the first 4 characters)."""
    if text is None:
        return "other"
    reply = text.lower().strip().replace(".", "")
    if reply in ("yes", "no"):
        return reply
    head = reply[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(records):
    """Set `record.correct` by MME's reading and return {category: {acc, acc_plus, score}, perception, cognition}.

    Values stay unrounded so that score is exactly acc + acc_plus and the sums add up.
    """
    by_category = {}
    for record in records:
        gold = record.answers[0].strip().lower() if len(record.answers) == 1 else ""
        if gold not in ("yes", "no"):
            raise InputError(f"{record.source}: an MME record needs one answer, Yes or No")
        if record.image_id is None:
            raise InputError(f"{record.source}: an MME record needs 'image_id' (or 'image')")
        record.correct = mme_reply(record.prediction) == gold
        by_category.setdefault(record.category, []).append(record)
    result = {}
    for category in sorted(by_category, key=category_rank):
        category_records = by_category[category]
        images = {}
        for record in category_records:
            images.setdefault(record.image_id, []).append(record.correct)
        acc = 100 * sum(record.correct for record in category_records) / len(category_records)
        acc_plus = 100 * sum(all(marks) for marks in images.values()) / len(images)
        result[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    result["perception"] = sum(result[name]["score"] for name in PERCEPTION if name in by_category)
    result["cognition"] = sum(result[name]["score"] for name in COGNITION if name in by_category)
    return result
