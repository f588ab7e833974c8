"""Answer every record of the config's test files with Lynx and write `{"index", "text_output"}` lines.

    python generate.py --config configs/LYNX.yaml --output_path ./result_0.jsonl --device cuda --seed 42
    python generate.py --config configs/LYNX.yaml --image tests/fixtures/tiny/images/img_a.jpg --question "What is it?"
    torchrun --nproc_per_node 8 generate.py ...     one process per GPU; rank 0 writes the file (lynx/processes.py)

Exit status: 0 all answered; 1 the run could not start or go on; 2 some records could not be answered (listed in
<output>.errors.jsonl); 64 the command line itself is wrong (usage); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys

# Only torch-free modules here: the arguments, the config, the test files, the output and the weight files are
# checked before torch is imported (about 10 s), so a mistake is reported in a moment.
from configs.schema import load_config
from dataset.prompt import warn_cut_prompts
from dataset.records import check_media_key, read_test_files
from errors import InputError
from lynx.ask import add_question_flags, answer_question, check_question_flags
from lynx.processes import Processes
from lynx.resumable import ResumableRun, run_fingerprint
from models.tokenizer import LynxTokenizer
from models.weight_files import check_weight_files, run_dtype

log = logging.getLogger("lynx")

EXIT_FAILED_RECORDS = 2  # kept from earlier versions: scripts test for it
EXIT_USAGE = 64  # sysexits.h's EX_USAGE, not argparse's 2, which would read as "some records failed"
MAX_SEED = 2**63 - 1


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error in one line, with its own exit status."""
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def seed_value(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {text}")
    return seed


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="./configs/LYNX.yaml")
    parser.add_argument("--output_path", default="./result_0.jsonl")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=seed_value, default=42)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value; dotted keys like data.num_frames); repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output, or a partial run made with other settings")
    parser.add_argument("--strict", action="store_true", help="stop at the first record that cannot be answered")
    add_question_flags(parser)
    args = parser.parse_args(argv)
    check_question_flags(parser, args)
    return args


def read_records(cfg):
    """The records of the config's test files; none at all, or a file with none of the media the config reads, is an
    error, before anything loads."""
    records = read_test_files(cfg.test_files)
    if not records:
        raise InputError(f"no records to answer: {', '.join(cfg.test_files)} (empty, or blank lines only)")
    check_media_key(records, cfg.vision_prompt_dict)
    return records


def answer(args, cfg, records, run: ResumableRun) -> int:
    """The steps that need torch (imported here): join the other processes, resume, load, answer, write.
    Returns how many records lack an answer."""
    from lynx.pipeline import LynxPipeline, seed_everything
    from lynx.run import answer_records

    device = run.processes.join(args.device)  # checks the device; the weight files were checked in main
    dtype = run_dtype(cfg, device)
    run.open(run_fingerprint(cfg, dtype, args.seed), args.overwrite)
    seed_everything(args.seed)  # the same on every process; sampled decoding seeds each batch (answer_records)
    pipeline = LynxPipeline.build(cfg, device, dtype)
    plan = run.plan(records, cfg.vision_prompt_dict, cfg.batch_size_test)
    if run.resumed:
        log.info("resuming: %d of %d records already answered", run.resumed, len(records))
    answer_records(pipeline, records, run, plan, args.seed, strict=args.strict)
    return run.finish(records)


def print_sample(records, run: ResumableRun, count: int = 6) -> None:
    """Show the first answers on stdout, so a run ends with something to read."""
    shown = [r for r in records if r.key in run.answers][:count]
    for record in shown:
        print(f"{record.index}\t{run.answers[record.key]}")
    if len(shown) < len(run.answers):
        print(f"... {len(run.answers) - len(shown)} more in {run.output_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    processes = Processes.from_env()  # torchrun / accelerate launch: this process's rank; else process 0 of 1
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {processes.prefix}%(message)s", datefmt="%H:%M:%S")
    run = ResumableRun(args.output_path, processes)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.question is not None:  # one question: its answer printed, no file written
            print(answer_question(cfg, args))
            return 0
        records = read_records(cfg)
        run.check_output(cfg.test_files, args.overwrite)
        check_weight_files(cfg, args.config, args.overrides)
        if processes.is_main:
            warn_cut_prompts(records, cfg, LynxTokenizer.of(cfg))
        unanswered = answer(args, cfg, records, run)
    except InputError as err:
        print(f"error: {processes.prefix}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if run.kept():
            print(f"interrupted: finished answers are kept in {run.partial_path}; run the same command again to "
                  f"resume", file=sys.stderr)
        else:
            print("interrupted before any answer was written; the same command starts again", file=sys.stderr)
        return 130
    if not processes.is_main:
        return 0  # rank 0 reports the run
    log.info("wrote %d answers to %s", len(records) - unanswered, args.output_path)
    print_sample(records, run)
    if unanswered:
        log.warning("%d of %d records could not be answered: see %s (the same command again retries only those)",
                    unanswered, len(records), run.whole_errors_path)
        return EXIT_FAILED_RECORDS
    return 0


if __name__ == "__main__":
    sys.exit(main())
