"""Reading annotation and answers files, and pairing every answer with its record by `index`."""

from dataclasses import dataclass, field
from pathlib import Path

from errors import InputError
from dataset.records import read_json_lines


@dataclass
class Record:
    """One annotated question and the model's answer to it (None when the answers file lacks it)."""

    index: object
    question: str
    answers: list
    category: str
    dataset: str
    image_id: object
    source: str  # "file:line", for messages
    prediction: str = None
    correct: bool = None  # set by the chosen scoring


@dataclass
class EvalSet:
    """The records of one annotation file: the unit of the paper's tables (images, videos, MME)."""

    name: str
    annotations: str
    answers: list
    records: list
    extra: list = field(default_factory=list)  # answer indices with no record (paired files only)

    @property
    def missing(self):
        return [record.index for record in self.records if record.prediction is None]


def index_key(index):
    """Indices match as text, so 7 in one file pairs with "7" in the other."""
    return str(index)


def read_annotations(path):
    """Read one annotation file into an EvalSet.

    A record lacking index, question or answer, or repeating an index, is an error naming file:line.
    """
    records, first_line = [], {}
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        for key in ("index", "question", "answer"):
            if key not in row:
                raise InputError(f"{where}: record has no '{key}'")
        answers = [row["answer"]] if isinstance(row["answer"], str) else row["answer"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{where}: 'answer' must be a string or a list of strings")
        key = index_key(row["index"])
        if key in first_line:
            raise InputError(f"{where}: duplicate index {row['index']!r} (also on line {first_line[key]})")
        first_line[key] = number
        records.append(Record(
            index=row["index"],
            question=str(row["question"]),
            answers=answers,
            category=str(row.get("class", "all")),
            dataset=str(row.get("dataset", Path(path).stem)),
            image_id=row.get("image_id", row.get("image")),
            source=where,
        ))
    datasets = {record.dataset for record in records}
    name = datasets.pop() if len(datasets) == 1 else Path(path).stem
    return EvalSet(name=name, annotations=str(path), answers=[], records=records)


def read_answers(paths):
    """Read answers files into {index key: (index, text)}; an index answered twice is an error."""
    answers, seen_at = {}, {}
    for path in paths:
        for number, row in read_json_lines(path):
            where = f"{path}:{number}"
            if "index" not in row or "text_output" not in row:
                raise InputError(f"{where}: an answer needs 'index' and 'text_output'")
            if not isinstance(row["text_output"], str):
                raise InputError(f"{where}: 'text_output' must be a string")
            key = index_key(row["index"])
            if key in answers:
                raise InputError(f"{where}: index {row['index']!r} answered twice (also at {seen_at[key]})")
            answers[key] = (row["index"], row["text_output"])
            seen_at[key] = where
    return answers


def attach_answers(eval_set, answers):
    """Give each record its answer, taking it out of `answers`; what is left over has no record."""
    for record in eval_set.records:
        found = answers.pop(index_key(record.index), None)
        record.prediction = None if found is None else found[1]


def join(answers_paths, annotation_paths):
    """Pair answers with records; return the sets and the indices of answers that match no record.

    With as many answers files as annotation files they pair by position (answers[i] with annotations[i]):
    Open_VQA_images and Open_VQA_videos both number their records from 1, so only the position tells them
    apart. Otherwise all answers form one pool, which is only sound when no index occurs in two annotation
    files; a collision is an error asking for one answers file per annotation file.
    """
    sets = [read_annotations(path) for path in annotation_paths]
    if len(answers_paths) == len(annotation_paths):
        extra = []
        for eval_set, answers_path in zip(sets, answers_paths):
            answers = read_answers([answers_path])
            attach_answers(eval_set, answers)
            eval_set.answers = [str(answers_path)]
            eval_set.extra = [index for index, _ in answers.values()]
            extra += eval_set.extra
        return sets, extra
    owner = {}
    for eval_set in sets:
        for record in eval_set.records:
            key = index_key(record.index)
            if key in owner:
                raise InputError(
                    f"index {record.index!r} is in both {owner[key]} and {eval_set.annotations}; give one answers "
                    f"file per annotation file, in the same order (--answers A B --annotations A B)")
            owner[key] = eval_set.annotations
    answers = read_answers(answers_paths)
    for eval_set in sets:
        attach_answers(eval_set, answers)
        eval_set.answers = [str(path) for path in answers_paths]
    return sets, [index for index, _ in answers.values()]
