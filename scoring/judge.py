"""Scoring by an LLM judge behind an OpenAI-compatible chat endpoint, with every verdict cached on disk.

The judge is asked through the `openai` client: a few questions at a time (`concurrency`), each retried with
backoff on 408/409/429 and 5xx answers and on connection errors (`retries`), honouring a server's Retry-After.

The cache is a jsonl file, one line per verdict with the raw reply, written as each verdict arrives, so a rerun
(after an interruption or a failure) asks only for what is missing, and each verdict can be read and audited. A
verdict is keyed by the model, the record (dataset, index) and the filled prompt, which holds the prompt template,
the question, the gold answers and the prediction: change any of them and that record is asked again.
"""

import hashlib
import json
import os
import re
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from errors import InputError
from dataset.records import read_json_lines
from scoring.records import index_key

PROMPT_PATH = Path(__file__).with_name("judge_prompt.txt")
API_KEY_VARIABLES = ("LYNX_JUDGE_API_KEY", "OPENAI_API_KEY")
NO_KEY = "EMPTY"  # sent when no key is set: the client needs one, and local servers take any (vLLM's convention)
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
    concurrency: int = 4  # questions in flight at once
    retries: int = 4  # tries after the first, with exponential backoff

    def __post_init__(self):
        if self.prompt_template is None:
            self.prompt_template = PROMPT_PATH.read_text(encoding="utf-8")
        if self.api_key is None:
            self.api_key = next((os.environ[name] for name in API_KEY_VARIABLES if os.environ.get(name)), None)


def base_url(url):
    """The OpenAI base URL (".../v1") of a base URL or of the full ".../chat/completions" one."""
    return url.rstrip("/").removesuffix("/chat/completions")


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


def client_of(judge):
    from openai import OpenAI  # imported here: scoring without a judge does not need it

    return OpenAI(base_url=base_url(judge.url), api_key=judge.api_key or NO_KEY, timeout=judge.timeout_s,
                  max_retries=judge.retries)


def ask(client, judge, prompt):
    """One chat completion's reply text, retried by the client; a failure that outlasts the retries is an
    InputError."""
    import openai

    url = base_url(judge.url)
    try:
        reply = client.chat.completions.create(model=judge.model, temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
    except openai.APIStatusError as error:
        raise InputError(f"judge {url} answered HTTP {error.status_code}: {str(error.message)[:300]}") from None
    except openai.APIConnectionError as error:
        raise InputError(f"cannot reach judge {url}: {error.__cause__ or error}") from None
    try:
        content = reply.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise InputError(f"judge {url} sent no chat completion: {str(reply)[:300]}")
    return content


def judge_records(records, judge):
    """Set `record.correct` from the judge, asking only for verdicts not in the cache.

    Each new verdict is appended to the cache as soon as it arrives, so a run that is interrupted, or stopped by a
    question that failed even after its retries, keeps what it paid for. A record without a prediction is wrong
    without asking; a reply with no verdict word counts as wrong and is listed. Returns {"requests", "cached",
    "unparsed": [(dataset, index)]}.
    """
    cache = load_cache(judge.cache_path)
    prompt_sha = sha256(judge.prompt_template)
    stats = {"requests": 0, "cached": 0, "unparsed": []}
    keys, asked = {}, {}  # record -> its key; key -> (record, prompt) of the verdicts to ask for
    for record in records:
        if record.prediction is not None:
            prompt = fill_prompt(judge.prompt_template, record)
            keys[id(record)] = key = cache_key(judge.model, record, prompt)
            if key not in cache:
                asked[key] = (record, prompt)
    Path(judge.cache_path).parent.mkdir(parents=True, exist_ok=True)
    failures = []
    with open(judge.cache_path, "a", encoding="utf-8") as cache_file, \
            ThreadPoolExecutor(max(1, judge.concurrency)) as pool:
        client = client_of(judge) if asked else None
        pending = {pool.submit(ask, client, judge, prompt): key for key, (_, prompt) in asked.items()}
        for future in as_completed(pending):
            try:
                reply = future.result()
            except CancelledError:
                continue
            except InputError as error:
                failures.append(error)
                for other in pending:  # those not started yet; those in flight finish and are kept
                    other.cancel()
                continue
            key = pending[future]
            record = asked[key][0]
            entry = {"key": key, "dataset": record.dataset, "index": record.index, "model": judge.model,
                     "prompt_sha256": prompt_sha, "question": record.question, "answers": record.answers,
                     "prediction": record.prediction, "reply": reply, "verdict": parse_verdict(reply)}
            cache_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            cache_file.flush()
            cache[key] = entry
            stats["requests"] += 1
    if failures:
        raise failures[0]
    for record in records:
        if record.prediction is None:
            record.correct = False
            continue
        key = keys[id(record)]
        entry = cache[key]
        stats["cached"] += key not in asked
        if entry["verdict"] is None:
            stats["unparsed"].append((record.dataset, record.index))
        record.correct = entry["verdict"] is True
    return stats
