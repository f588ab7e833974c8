"""Rule scoring of free-text answers against Open-VQA's gold answers (see docs/scoring.md, "Rules").

The paper does not say how answers were judged; these rules are a transparent, repeatable stand-in.
"""

import re

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
YES_NO = ("yes", "no")

# Everything that is neither a word character nor white space, and the underscore (a word character to `\w`).
PUNCTUATION = re.compile(r"[^\w\s]|_")
# Gold answers such as "platform or tunnel" or "doughnuts/donuts" list alternatives.
ALTERNATIVE_SEPARATOR = re.compile(r"\s+or\s+|/", re.IGNORECASE)


def normalise(text):
    """Lower-case, punctuation to spaces, no articles, number words zero..twenty as digits, single spaces."""
    words = PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


def gold_alternatives(answers):
    """Every gold string and each of its parts split on " or " and "/", split raw and then normalised.

    Splitting comes first because normalising turns "/" into a space and would hide the separator.
    Alternatives that normalise to nothing (e.g. "the") are dropped: they would match any prediction.
    """
    alternatives = []
    for answer in answers:
        for part in [answer, *ALTERNATIVE_SEPARATOR.split(answer)]:
            alternative = normalise(part)
            if alternative and alternative not in alternatives:
                alternatives.append(alternative)
    return alternatives


def first_yes_no(normalised_prediction):
    """The first word of the prediction that is "yes" or "no", or None."""
    return next((word for word in normalised_prediction.split() if word in YES_NO), None)


def alternative_matches(alternative, normalised_prediction):
    """A yes/no alternative must equal the prediction's first yes/no word; any other must occur as whole words."""
    if alternative in YES_NO:
        return first_yes_no(normalised_prediction) == alternative
    return f" {alternative} " in f" {normalised_prediction} "


def is_correct(answers, prediction):
    """True when any gold alternative matches the prediction; a missing prediction (None) is wrong."""
    if prediction is None:
        return False
    normalised_prediction = normalise(prediction)
    return any(alternative_matches(alternative, normalised_prediction)
               for alternative in gold_alternatives(answers))
