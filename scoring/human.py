"""Human scoring: export the records to a CSV to mark by hand, and read the marks back."""

import csv

from errors import InputError
from scoring.records import index_key

COLUMNS = ("dataset", "index", "class", "question", "gold_answers", "prediction", "correct")
TRUE_MARKS = {"1", "y", "yes", "true", "correct", "x"}
FALSE_MARKS = {"0", "n", "no", "false", "incorrect", "wrong"}


def same_text(a, b):
    """Spreadsheets may change line ends and trailing spaces; compare the words only."""
    return a.split() == b.split()


def export_csv(path, sets, prefill=True):
    """One row per record; `correct` holds this run's verdict (1/0), or is empty with prefill=False."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for eval_set in sets:
            for record in eval_set.records:
                mark = "" if not prefill or record.correct is None else int(record.correct)
                writer.writerow([eval_set.name, record.index, record.category, record.question,
                                 " | ".join(record.answers), record.prediction or "", mark])


def parse_mark(text, where):
    mark = text.strip().lower()
    if mark in TRUE_MARKS:
        return True
    if mark in FALSE_MARKS:
        return False
    if not mark:
        raise InputError(f"{where}: not marked (put 1 or 0 in 'correct')")
    raise InputError(f"{where}: cannot read the mark {text!r} (use 1/0, yes/no, correct/incorrect)")


def read_marks(path, sets):
    """Set `record.correct` from the marks in the CSV.

    Every record needs one marked row whose prediction is the one in the answers file (so marks made for
    other answers are not reused by mistake). A record without an answer stays wrong whatever its mark.
    """
    by_key = {(eval_set.name, index_key(record.index)): record
              for eval_set in sets for record in eval_set.records}
    marked = set()
    try:
        handle = open(path, encoding="utf-8", newline="")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    with handle:
        reader = csv.DictReader(handle)
        absent = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if absent:
            raise InputError(f"{path}: missing column(s) {', '.join(absent)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            key = (row["dataset"], index_key(row["index"]))
            record = by_key.get(key)
            if record is None:
                raise InputError(f"{where}: no record {row['index']!r} in {row['dataset']!r}")
            if key in marked:
                raise InputError(f"{where}: record {row['index']!r} of {row['dataset']!r} is marked twice")
            if not same_text(row["prediction"], record.prediction or ""):
                raise InputError(f"{where}: the prediction differs from the answers file; export the CSV again")
            mark = parse_mark(row["correct"], where)
            record.correct = mark and record.prediction is not None
            marked.add(key)
    unmarked = [f"{dataset}:{index}" for dataset, index in by_key if (dataset, index) not in marked]
    if unmarked:
        shown = ", ".join(unmarked[:10]) + (" ..." if len(unmarked) > 10 else "")
        raise InputError(f"{path}: {len(unmarked)} record(s) have no row: {shown}")
