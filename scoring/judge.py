"""Scoring by an LLM judge behind an OpenAI-compatible chat endpoint, with every verdict cached on disk.

The cache is a jsonl file, one line per verdict with the raw reply, so a rerun costs nothing and each verdict
can be read and audited. A verdict is keyed by the model, the record (dataset, index) and the filled prompt,
which holds the prompt template, the question, the gold answers and the prediction: change any of them and
that record is asked again.
"""

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from errors import InputError
from dataset.records import read_json_lines
from scoring.records import index_key

PROMPT_PATH = Path(__file__).with_name("judge_prompt.txt")
API_KEY_VARIABLES = ("LYNX_JUDGE_API_KEY", "OPENAI_API_KEY")
POSITIVE_WORDS = {"yes", "correct"}
NEGATIVE_WORDS = {"no", "incorrect", "not"}


@dataclass
class Judge:
    """Where and whom to ask, and where the verdicts are kept."""

    url: str
    model: str
    cache_path: Path
    api_key: str = None
    timeout_s: float = 60.0
    prompt_template: str = None

    def __post_init__(self):
        if self.prompt_template is None:
            self.prompt_template = PROMPT_PATH.read_text(encoding="utf-8")
        if self.api_key is None:
            self.api_key = next((os.environ[name] for name in API_KEY_VARIABLES if os.environ.get(name)), None)


def chat_completions_url(url):
    """Accept a base URL (".../v1") or the full ".../chat/completions" one."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def fill_prompt(template, record):
    """The prompt for one record; plain replacement, so braces in questions or answers stay as they are."""
    return (template.replace("{question}", record.question)
            .replace("{answers}", " | ".join(record.answers))
            .replace("{prediction}", record.prediction))


def parse_verdict(reply):
    """The first verdict word of the reply: yes/correct → True, no/incorrect/not → False, none → None."""
    for word in re.findall(r"[a-z]+", reply.lower()):
        if word in POSITIVE_WORDS:
            return True
        if word in NEGATIVE_WORDS:
            return False
    return None


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(model, record, prompt):
    return sha256(json.dumps([model, record.dataset, index_key(record.index), prompt]))


def load_cache(path):
    """Read the cached verdicts, {key: entry}; a later line for the same key wins."""
    if not Path(path).exists():
        return {}
    entries = {}
    for number, entry in read_json_lines(path):
        if "key" not in entry or "verdict" not in entry:
            raise InputError(f"{path}:{number}: a cache line needs 'key' and 'verdict'")
        entries[entry["key"]] = entry
    return entries


def ask(judge, prompt):
    """POST one chat completion and return the reply text; any failure is a InputError."""
    body = json.dumps({
        "model": judge.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
    }).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if judge.api_key:
        headers["Authorization"] = f"Bearer {judge.api_key}"
    url = chat_completions_url(judge.url)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=judge.timeout_s) as response:
            payload = response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")[:300]
        raise InputError(f"judge {url} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise InputError(f"cannot reach judge {url}: {getattr(error, 'reason', error)}") from None
    try:
        return json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise InputError(f"judge {url} sent no chat completion: {payload[:300]}") from None


def judge_records(records, judge):
    """Set `record.correct` from the judge, asking only for verdicts not in the cache.

    Each new verdict is appended to the cache as soon as it arrives, so an interrupted run keeps what it
    paid for. A record without a prediction is wrong without asking; a reply with no verdict word counts
    as wrong and is listed. Returns {"requests", "cached", "unparsed": [(dataset, index)]}.
    """
    cache = load_cache(judge.cache_path)
    prompt_sha = sha256(judge.prompt_template)
    stats = {"requests": 0, "cached": 0, "unparsed": []}
    Path(judge.cache_path).parent.mkdir(parents=True, exist_ok=True)
    with open(judge.cache_path, "a", encoding="utf-8") as cache_file:
        for record in records:
            if record.prediction is None:
                record.correct = False
                continue
            prompt = fill_prompt(judge.prompt_template, record)
            key = cache_key(judge.model, record, prompt)
            entry = cache.get(key)
            if entry is None:
                reply = ask(judge, prompt)
                entry = {"key": key, "dataset": record.dataset, "index": record.index, "model": judge.model,
                         "prompt_sha256": prompt_sha, "question": record.question, "answers": record.answers,
                         "prediction": record.prediction, "reply": reply, "verdict": parse_verdict(reply)}
                cache_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                cache_file.flush()
                cache[key] = entry
                stats["requests"] += 1
            else:
                stats["cached"] += 1
            if entry["verdict"] is None:
                stats["unparsed"].append((record.dataset, record.index))
            record.correct = entry["verdict"] is True
    return stats
