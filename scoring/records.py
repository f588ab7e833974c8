"""Reading annotation and answers files, and pairing every answer with its record by `index`."""

from dataclasses import dataclass, field
from pathlib import Path

from errors import InputError
from dataset.records import IndexBook, checked_index, index_key, read_json_lines

# A set with answers for fewer than this share of its records gets a warning: most of it would count as wrong.
FEW_ANSWERS = 0.5


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
    warnings: list = field(default_factory=list)  # few shared indices: see few_answers

    @property
    def missing(self):
        return [record.index for record in self.records if record.prediction is None]


def read_annotations(path):
    """Read one annotation file into an EvalSet.

    A record lacking index, question or answer, or repeating an index, is an error naming file:line. Indices follow
    generate.py's rule (dataset.records): an integer or a string, and `1` and `"1"` are the same index.
    """
    records, seen = [], IndexBook()
    for number, row in read_json_lines(path):
        where = f"{path}:{number}"
        seen.add(checked_index(row, where), path, number)
        for key in ("question", "answer"):
            if key not in row:
                raise InputError(f"{where}: record has no '{key}'")
        answers = [row["answer"]] if isinstance(row["answer"], str) else row["answer"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{where}: 'answer' must be a string or a list of strings")
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
    if not records:
        raise InputError(f"{path}: holds no records")
    return EvalSet(name=name, annotations=str(path), answers=[], records=records)


def read_answers(paths):
    """Read answers files into {index key: (index, text)}; an index answered twice (in one file or across shards)
    is an error naming both places."""
    answers, seen = {}, IndexBook()
    for path in paths:
        for number, row in read_json_lines(path):
            where = f"{path}:{number}"
            index = checked_index(row, where)
            if not isinstance(row.get("text_output"), str):
                raise InputError(f"{where}: an answer needs 'text_output', a string")
            answers[seen.add(index, path, number)] = (index, row["text_output"])
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
    Answers that share no index with their records (the wrong pair of files) are an error, not a score of 0.
    """
    sets = [read_annotations(path) for path in annotation_paths]
    if len(answers_paths) == len(annotation_paths):
        extra = []
        for eval_set, answers_path in zip(sets, answers_paths):
            answers = read_answers([answers_path])
            count = len(answers)
            attach_answers(eval_set, answers)
            eval_set.answers = [str(answers_path)]
            eval_set.extra = [index for index, _ in answers.values()]
            extra += eval_set.extra
            check_shared([eval_set], [answers_path], count)
            eval_set.warnings = few_answers(eval_set, count)
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
    count = len(answers)
    for eval_set in sets:
        attach_answers(eval_set, answers)
        eval_set.answers = [str(path) for path in answers_paths]
    check_shared(sets, answers_paths, count)
    for eval_set in sets:
        eval_set.warnings = few_answers(eval_set)
    return sets, [index for index, _ in answers.values()]


def check_shared(sets, answers_paths, count):
    """InputError when not one record of `sets` found an answer among the `count` answers of `answers_paths`."""
    if any(record.prediction is not None for eval_set in sets for record in eval_set.records):
        return
    answers = " ".join(str(path) for path in answers_paths)
    annotations = " ".join(eval_set.annotations for eval_set in sets)
    if not count:
        raise InputError(f"{answers}: holds no answers (scoring it against {annotations} would give 0)")
    raise InputError(f"{answers} and {annotations} share no index: these answers are not for these records "
                     f"(check the pair of files, and their order)")


def few_answers(eval_set, count=None):
    """Warnings when few indices are shared: fewer than FEW_ANSWERS of the set's records have an answer, or, for an
    answers file paired with this set alone (`count` answers), fewer than FEW_ANSWERS of its answers have a record
    (e.g. the video answers scored against the image annotations: both number from 1)."""
    answered = sum(record.prediction is not None for record in eval_set.records)
    total, answers = len(eval_set.records), " ".join(eval_set.answers)
    few = f"fewer than {FEW_ANSWERS:.0%}"
    lines = []
    if answered < FEW_ANSWERS * total:
        lines.append(f"only {answered} of the {total} records of {eval_set.annotations} have an answer in {answers} "
                     f"({few}); the other {total - answered} count as wrong")
    if count is not None and answered < FEW_ANSWERS * count:
        lines.append(f"only {answered} of the {count} answers in {answers} have a record in {eval_set.annotations} "
                     f"({few}); the other {count - answered} are ignored")
    return lines
