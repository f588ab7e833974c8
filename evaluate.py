"""Score Lynx answers files: Open-VQA by rules (default), an LLM judge or human marks, and MME.

    python evaluate.py --answers result_images.jsonl --annotations data/Open_VQA_images.jsonl \
        --json scores.json --markdown scores.md --chart scores.png
    python evaluate.py --mme-convert MME_Benchmark_release_version --out data/MME.jsonl
    python evaluate.py --mme --answers result_mme.jsonl --annotations data/MME.jsonl --json mme.json

The rules, the judge, human scoring and the report are described in docs/scoring.md. Importable:
`evaluate(answers_paths, annotation_paths, scoring="rule")` returns the JSON report as a dict.
"""

import argparse
import json
import sys
from pathlib import Path

from errors import InputError
from scoring.human import export_csv, read_marks
from scoring.judge import Judge, judge_records
from scoring.mme import convert_mme, score_mme
from scoring.records import join
from scoring.report import build_report, render_markdown, write_chart
from scoring.rules import is_correct

SCORINGS = ("rule", "judge", "human", "mme")


def score_records(sets, scoring, judge=None, human_csv=None):
    """Set `correct` on every record by the chosen scoring; return what that scoring adds to the report."""
    records = [record for eval_set in sets for record in eval_set.records]
    if scoring == "rule":
        for record in records:
            record.correct = is_correct(record.answers, record.prediction)
    elif scoring == "judge":
        stats = judge_records(records, judge)
        return {"judge": {"model": judge.model, "url": judge.url, "cache": str(judge.cache_path), **stats}}
    elif scoring == "human":
        read_marks(human_csv, sets)
    elif scoring == "mme":
        return {"mme": score_mme(records)}
    else:
        raise ValueError(f"unknown scoring {scoring!r}; one of {', '.join(SCORINGS)}")
    return {}


def scored_sets(answers_paths, annotation_paths, scoring="rule", judge=None, human_csv=None):
    """(sets, report): answers joined with annotations and scored. Files that share no index are an error; few
    shared indices are listed under the report's "warnings"."""
    sets, extra = join(answers_paths, annotation_paths)
    return sets, build_report(sets, extra, scoring, score_records(sets, scoring, judge, human_csv))


def evaluate(answers_paths, annotation_paths, scoring="rule", judge=None, human_csv=None):
    """Join answers with annotations, score them, and return the JSON report (a dict)."""
    return scored_sets(answers_paths, annotation_paths, scoring, judge, human_csv)[1]


def default_judge_cache(answers_path):
    """Beside the (first) answers file: result.jsonl → result.judge.jsonl."""
    path = Path(answers_path)
    return path.with_name(path.stem + ".judge.jsonl")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Score Lynx answers (Open-VQA rules by default, --judge, --human-csv or --mme) "
                    "and report per class beside the paper's Lynx row. See docs/scoring.md.")
    parser.add_argument("--answers", nargs="+", metavar="FILE",
                        help="answers jsonl ({index, text_output}); one per annotation file, in the same order")
    parser.add_argument("--annotations", nargs="+", metavar="FILE", help="annotation jsonl file(s)")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--judge", action="store_true", help="score with an LLM judge (needs --judge-model)")
    method.add_argument("--human-csv", metavar="PATH", help="score from the hand marks of an exported CSV")
    method.add_argument("--mme", action="store_true", help="MME scoring: acc, acc+, perception, cognition")
    parser.add_argument("--judge-url", default="https://api.openai.com/v1",
                        help="OpenAI-compatible base URL, or the full .../chat/completions URL")
    parser.add_argument("--judge-model", help="model name sent to the judge")
    parser.add_argument("--judge-cache", metavar="PATH",
                        help="verdict cache (jsonl); default: beside the first answers file, NAME.judge.jsonl")
    parser.add_argument("--judge-timeout", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--judge-concurrency", type=int, default=4, metavar="N", help="questions in flight at once")
    parser.add_argument("--judge-retries", type=int, default=4, metavar="N",
                        help="tries after the first on 429, 5xx and connection errors, with backoff")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON")
    parser.add_argument("--markdown", metavar="OUT", help="write the report as markdown")
    parser.add_argument("--chart", metavar="OUT", help="write a PNG bar chart of per-class accuracy")
    parser.add_argument("--export-csv", metavar="PATH",
                        help="write a CSV to mark by hand, 'correct' prefilled with this run's verdicts")
    parser.add_argument("--export-blank", action="store_true", help="leave 'correct' empty in --export-csv")
    parser.add_argument("--mme-convert", metavar="MME_ROOT", help="convert the MME release folder (with --out)")
    parser.add_argument("--out", metavar="PATH", help="jsonl written by --mme-convert")
    return parser


def write_text(path, text):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def run(args, parser):
    if args.mme_convert:
        if not args.out:
            parser.error("--mme-convert needs --out PATH")
        count, skipped = convert_mme(args.mme_convert, args.out)
        print(f"wrote {count} MME questions to {args.out}")
        if skipped:
            print(f"skipped folders that are not MME categories: {', '.join(skipped)}", file=sys.stderr)
        return
    if not args.answers or not args.annotations:
        parser.error("--answers and --annotations are required")
    judge = None
    scoring = "judge" if args.judge else "human" if args.human_csv else "mme" if args.mme else "rule"
    if args.judge:
        if not args.judge_model:
            parser.error("--judge needs --judge-model")
        judge = Judge(url=args.judge_url, model=args.judge_model, timeout_s=args.judge_timeout,
                      cache_path=Path(args.judge_cache or default_judge_cache(args.answers[0])),
                      concurrency=args.judge_concurrency, retries=args.judge_retries)
    sets, report = scored_sets(args.answers, args.annotations, scoring, judge, args.human_csv)
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    markdown = render_markdown(report)
    print(markdown)
    if judge:
        stats = report["judge"]
        print(f"judge: {stats['requests']} request(s), {stats['cached']} from the cache {stats['cache']}",
              file=sys.stderr)
    if args.json:
        write_text(args.json, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.markdown:
        write_text(args.markdown, markdown + "\n")
    if args.chart:
        write_chart(report, args.chart)
    if args.export_csv:
        export_csv(args.export_csv, sets, prefill=not args.export_blank)


def main(argv=None):
    """CLI entry: bad input is reported in one line with exit status 1, never as a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, parser)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
