"""Answer every record of the config's test files with Lynx and write `{"index", "text_output"}` lines.

    python generate.py --config configs/LYNX.yaml --output_path ./result_0.jsonl --device cuda --seed 42

Exit status: 0 all answered, 2 some records failed (listed in <output>.errors.jsonl), 1 the run could not start.
"""
from __future__ import annotations

import argparse
import logging
import sys

from configs.schema import load_config
from dataset.errors import InputError
from dataset.records import read_test_files
from lynx.answers import AnswerStore, file_stamp, fingerprint
from lynx.pipeline import LynxPipeline, default_device, seed_everything
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
    """Everything that changes the answers, for the resume fingerprint."""
    settings = cfg.to_dict()
    settings["data"].pop("num_workers")
    settings.update(resolved_dtype=cfg.resolve_dtype(device), seed=seed,
                    weights=[file_stamp(p) for p in (cfg.vit_checkpoint, cfg.llm_dir, cfg.checkpoint)],
                    test_files=[file_stamp(p) for p in cfg.test_files])
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        device = args.device or default_device()
        records = read_test_files(cfg.test_files)
        store = AnswerStore(args.output_path)
        store.check_writable(args.overwrite)
        check_weight_files(cfg)
        seed_everything(args.seed)
        pipeline = LynxPipeline.from_config(cfg, device)
        resumed = store.open(fingerprint(run_settings(cfg, device, args.seed)), args.overwrite)
        if resumed:
            log.info("resuming: %d of %d records already answered", resumed, len(records))
        answer_records(pipeline, records, store, list(range(len(records))), args.seed, strict=args.strict)
    except (InputError, StopRun) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: finished answers are kept in {store.partial_path}; run the same command again to "
              f"resume", file=sys.stderr)
        return 130
    unanswered = store.finish(records)
    log.info("wrote %d answers to %s", len(records) - unanswered, args.output_path)
    print_sample(records, store)
    if unanswered:
        log.warning("%d records could not be answered: see %s (rerun to retry them)", unanswered, store.errors_path)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
