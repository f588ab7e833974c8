"""One question about one image or video from the command line, its answer printed:

    python generate.py --config configs/LYNX.yaml --image tests/fixtures/tiny/images/img_a.jpg \
        --question "What is in the image?"

The question is a record of its own (index 0) and goes where a test file's record goes: the config's prompt, the
dataset's media reading, the pipeline's decoding with the seed of a run's first batch. So it gets the answer that a
run of a test file holding only this record writes; nothing is written to disk. The config, the weight files and
the media are checked before torch is imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random

from dataset.images import open_image
from dataset.prompt import format_prompt, warn_cut_prompts
from dataset.records import Record
from dataset.video import load_video_frames
from errors import InputError, RecordError
from models.tokenizer import LynxTokenizer
from models.weight_files import check_weight_files

MEDIA_FLAGS = ("image", "video")


def add_question_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("one question (prints its answer, writes no file)")
    group.add_argument("--image", help="the image to ask about (a path or base64)")
    group.add_argument("--video", help="the video to ask about (a video file, or a .json file of base64 frames)")
    group.add_argument("--question", help="the question about --image or --video")


def check_question_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--question with exactly one of --image and --video, or none of the three (a run of the test files)."""
    given = [f"--{flag}" for flag in MEDIA_FLAGS if getattr(args, flag) is not None]
    if len(given) > 1:
        parser.error("--image and --video together: one question is about one image or one video")
    if given and args.question is None:
        parser.error(f"{given[0]} needs --question, e.g. --question \"What is in the image?\"")
    if args.question is not None and not given:
        parser.error("--question needs --image or --video, the media it is about")


def question_record(cfg, args: argparse.Namespace) -> tuple:
    """(config, record) for the question: the config reads the record's media kind. Refuses, before torch is
    imported, a prompt that needs fields other than {question}, missing weight files and media that cannot be read."""
    kind = "image" if args.image is not None else "video"
    media = getattr(args, kind)
    try:
        format_prompt(cfg.prompt, {"question": args.question}, cfg.lower_text)
    except RecordError as err:
        raise InputError(f"{args.config}: {err.reason}; --question fills only {{question}}") from None
    check_weight_files(cfg, args.config, args.overrides)
    try:
        if kind == "image":
            open_image(media)
        else:  # the frames a run would read (random sampling: one draw of them)
            load_video_frames(media, cfg.data.num_frames, cfg.data.frame_sampling, rng=random.Random(0))
    except RecordError as err:
        where = f"--{kind} {err.path}" if err.path else f"--{kind}"
        if err.path and not os.path.exists(err.path) and not os.path.isabs(err.path):
            where += f" (relative to the working directory {os.getcwd()})"
        raise InputError(f"{where}: {err.reason}") from None
    record = Record({"index": 0, "question": args.question, kind: media}, "--question", 0, 0)
    warn_cut_prompts([record], cfg, LynxTokenizer.of(cfg))
    return dataclasses.replace(cfg, vision_prompt_dict=kind), record


def answer_question(cfg, args: argparse.Namespace) -> str:
    """The answer to --question about --image or --video."""
    cfg, record = question_record(cfg, args)
    from dataset.batching import LynxEvalDataset
    from lynx.pipeline import LynxPipeline, check_device, default_device, seed_everything

    device = args.device or default_device()
    check_device(device)  # the weight files were checked above, with the media
    seed_everything(args.seed)
    pipeline = LynxPipeline.build(cfg, device)
    item = LynxEvalDataset([record], pipeline.prepare, cfg.vision_prompt_dict, args.seed)[0]
    if item.error is not None:
        raise InputError(f"--{cfg.vision_prompt_dict}: {item.error.reason}")
    answer = pipeline.answer_batch(pipeline.collate([item]), seed=args.seed)[0]
    if isinstance(answer, RecordError):  # out of memory even alone
        raise InputError(f"--{cfg.vision_prompt_dict}: {answer.reason}")
    return answer.text
