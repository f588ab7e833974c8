"""Answer every record of the config's test files with Lynx and write `{"index", "text_output"}` lines.

    python generate.py --config configs/LYNX.yaml --output_path ./result_0.jsonl --device cuda --seed 42
    torchrun --nproc_per_node 8 generate.py ...     one process per GPU; rank 0 writes the file (lynx/distributed.py)

Exit status: 0 all answered, 2 some records failed (listed in <output>.errors.jsonl), 1 the run could not start.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from configs.schema import load_config
from errors import InputError
from dataset.records import read_test_files
from lynx.answers import AnswerStore, file_stamp, fingerprint
from lynx.distributed import Ranks
from lynx.pipeline import LynxPipeline, seed_everything
from lynx.run import StopRun, answer_records
from models.build import check_weight_files

log = logging.getLogger("lynx")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="./configs/LYNX.yaml")
    parser.add_argument("--output_path", default="./result_0.jsonl")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value; dotted keys like data.num_frames); repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output, or a partial run made with other settings")
    parser.add_argument("--strict", action="store_true", help="stop at the first record that cannot be answered")
    return parser.parse_args(argv)


def run_settings(cfg, device: str, seed: int) -> dict:
    """Everything that changes the answers, for the resume fingerprint. Records are matched by content (their
    `key`), so the test files themselves are not part of it."""
    settings = cfg.to_dict()
    settings["data"].pop("num_workers")
    settings.update(resolved_dtype=cfg.resolve_dtype(device), seed=seed,
                    weights=[file_stamp(p) for p in (cfg.vit_checkpoint, cfg.llm_dir, cfg.checkpoint)])
    return settings


def print_sample(records, store: AnswerStore, count: int = 6) -> None:
    """Show the first answers on stdout, so a run ends with something to read."""
    shown = [r for r in records if r.key in store.answers][:count]
    for record in shown:
        print(f"{record.index}\t{store.answers[record.key]}")
    if len(shown) < len(store.answers):
        print(f"... {len(store.answers) - len(shown)} more in {store.output_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    ranks = Ranks.from_env()  # torchrun / accelerate launch: this process's rank; else rank 0 of 1
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {ranks.prefix}%(message)s", datefmt="%H:%M:%S")
    store = None
    try:
        cfg = load_config(args.config, args.overrides)
        device = ranks.start(args.device)
        records = read_test_files(cfg.test_files)
        store = AnswerStore(args.output_path, suffix=ranks.suffix)
        ranks.check_writable(store, args.overwrite)
        check_weight_files(cfg)
        run_fingerprint = fingerprint(run_settings(cfg, device, args.seed))
        ranks.check_resume(store, run_fingerprint, args.overwrite)
        seed_everything(args.seed + ranks.rank)  # as the original: sampled answers depend on the rank
        pipeline = LynxPipeline.from_config(cfg, device)
        resumed = ranks.open(store, run_fingerprint, args.overwrite)
        if resumed:
            log.info("resuming: %d of %d records already answered", resumed, len(records))
        batches = ranks.share(records, cfg)
        answer_records(pipeline, records, store, [p for batch in batches for p in batch], args.seed,
                       strict=args.strict, batches=batches)
    except (InputError, StopRun) as err:
        print(f"error: {ranks.prefix}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if store is not None and os.path.exists(store.partial_path):
            print(f"interrupted: finished answers are kept in {store.partial_path}; run the same command again to "
                  f"resume", file=sys.stderr)
        else:
            print("interrupted before any answer", file=sys.stderr)
        return 130
    try:
        store, unanswered = ranks.finish(store, records)
    except InputError as err:
        print(f"error: {ranks.prefix}{err}", file=sys.stderr)
        return 1
    if not ranks.is_main:
        return 0  # rank 0 reports the run
    log.info("wrote %d answers to %s", len(records) - unanswered, args.output_path)
    print_sample(records, store)
    if unanswered:
        log.warning("%d of %d records could not be answered: see %s (the same command again retries only those)",
                    unanswered, len(records), store.errors_path)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
