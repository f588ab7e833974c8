"""Write a converted folder: the whole model of a config as one .safetensors file in its own key layout.

    python -m lynx.convert --config configs/LYNX.yaml --out data/lynx-bf16/ [--dtype bfloat16] [--set key=value]

Then run with `--set converted=data/lynx-bf16` (or `converted:` in the config): the model is memory-mapped from
that file with no conversion; the release files are not read. The folder's layout: models/converted.py.
Tensors are made and written one at a time, so converting needs little more host memory than its largest tensor.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

import yaml

from configs.schema import DTYPES, load_config
from errors import InputError
from models.weight_files import CONVERTED_CONFIG, CONVERTED_LLM, CONVERTED_WEIGHTS, LLM_SIDE_FILES, \
    check_weight_files

log = logging.getLogger("lynx")


def convert(cfg, out: str, dtype: str) -> int:
    """Write `out` (a converted folder) from the config's release files; returns the weight file's size."""
    if cfg.converted is not None:
        raise InputError(f"the config already reads a converted folder ({cfg.converted}); convert from the release "
                         f"files (converted: null)")
    check_weight_files(cfg)
    from models.build import TORCH_DTYPES, plan_lynx  # torch: imported once the flags and files are checked
    from models.tensor_files import write_safetensors

    model, plan, reports, _ = plan_lynx(cfg)
    for report in reports:
        log.info("%s", report.summary())
    os.makedirs(os.path.join(out, CONVERTED_LLM), exist_ok=True)
    for name in LLM_SIDE_FILES:
        if os.path.isfile(os.path.join(cfg.llm_dir, name)):
            shutil.copy(os.path.join(cfg.llm_dir, name), os.path.join(out, CONVERTED_LLM, name))
    made_from = cfg.to_dict() | {"quantize": None, "quantize_vit": False}
    with open(os.path.join(out, CONVERTED_CONFIG), "w", encoding="utf-8") as f:
        f.write("# The config this converted folder was made from (python -m lynx.convert).\n")
        yaml.safe_dump(made_from, f, sort_keys=False, allow_unicode=True)
    ordered = {key: plan[key] for key in model.state_dict() if key in plan}
    return write_safetensors(os.path.join(out, CONVERTED_WEIGHTS), ordered, TORCH_DTYPES[dtype],
                             metadata={"format": "lynx-converted", "dtype": dtype})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="folder to write (created; its files are replaced)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the stored weights (default: the config's dtype, else bfloat16)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        dtype = args.dtype or cfg.dtype or "bfloat16"
        start = time.perf_counter()
        size = convert(cfg, args.out, dtype)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("wrote %s (%.2f GB, %s) in %.1f s; run with --set converted=%s", os.path.join(args.out, CONVERTED_WEIGHTS),
             size / 1e9, dtype, time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
