"""Build Lynx from a config: ViT from eva_vit_g.pth, LLM from its folder, then the Lynx checkpoint on top — or the
whole model from a converted folder — straight onto the device, tensor by tensor (see models/loading.py)."""
from __future__ import annotations

import functools
import logging
import os

import torch
from transformers import AutoConfig, GenerationConfig

from configs.schema import DTYPES, LynxConfig
from errors import InputError
from models.converted import converted_plan
from models.loading import materialise, release_plan
from models.lynx import Lynx, LynxLlamaForCausalLM, vit_chunk_for
from models.quantize import Quantizer
from models.tokenizer import LynxTokenizer
from models.weight_files import llm_folder, run_dtype

log = logging.getLogger("lynx")
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def read_llm_config(folder: str):
    try:
        return AutoConfig.from_pretrained(folder, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: cannot read the LLM's config.json ({str(err).splitlines()[0]})") from None


def on_meta(build):
    """`build` with every module it creates on the meta device: shapes, no memory, no weights."""
    @functools.wraps(build)
    def on_meta_device(*args, **kwargs):
        with torch.device("meta"):
            return build(*args, **kwargs)
    return on_meta_device


@on_meta
def model_skeleton(cfg: LynxConfig, llm_config, device: str = "cpu") -> Lynx:
    """Lynx on the meta device: lets the weight files be checked before anything loads, then `materialise`s."""
    llm = LynxLlamaForCausalLM(llm_config)
    model = Lynx(cfg, llm, vit_chunk=vit_chunk_for(cfg, device))
    return model


def plan_lynx(cfg: LynxConfig, device: str = "cpu",
              dtype: str | None = None) -> tuple[Lynx, dict, list, LynxTokenizer]:
    """Lynx on the meta device, the plan of its weights with every file checked against its shapes (nothing read
    yet: a bad file fails in seconds), the load reports and the tokenizer. `dtype`: the run's (default:
    models.weight_files.run_dtype)."""
    dtype = TORCH_DTYPES[dtype or run_dtype(cfg, device)]
    folder = llm_folder(cfg)
    tokenizer = LynxTokenizer.of(cfg)
    llm_config = read_llm_config(folder)
    file_vocab = llm_config.vocab_size
    llm_config.vocab_size = tokenizer.vocab_size  # [PAD] appended
    model = model_skeleton(cfg, llm_config, device)
    if cfg.converted is not None:
        plan, reports = converted_plan(cfg.converted, model, dtype, mapped=cfg.quantize is None)
    else:
        plan, reports = release_plan(cfg, model, file_vocab)
    return model, plan, reports, tokenizer


def build_lynx(cfg: LynxConfig, device: str = "cpu", dtype: str | None = None) -> tuple[Lynx, LynxTokenizer]:
    """The model in eval mode on `device` in `dtype` (default: models.weight_files.run_dtype; linear layers
    quantized if the config says so), and its tokenizer. Prints a load report. The weight files are checked by the
    caller (models.weight_files.check_weight_files, before torch is imported); a file that does not fit fails here."""
    dtype = dtype or run_dtype(cfg, device)
    model, plan, reports, tokenizer = plan_lynx(cfg, device, dtype)
    dtype = TORCH_DTYPES[dtype]
    quantizer = Quantizer(model, cfg.quantize, device, dtype, vit=cfg.quantize_vit) if cfg.quantize else None
    if cfg.dtype is None and cfg.converted is not None:
        log.info("dtype %s: the converted folder's own (dtype is unset)", str(dtype).removeprefix("torch."))
    materialise(model, plan, device, dtype, quantizer)
    model.LLM.config.dtype = dtype
    folder = llm_folder(cfg)
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.LLM.generation_config = GenerationConfig.from_pretrained(folder)
    log.info("%s: LLM loaded (%d layers, adapters on %s)", folder, model.LLM.config.num_hidden_layers,
             model.adapter_layers)
    for report in reports:
        log.info("%s", report.summary())
    if quantizer is not None:
        log.info("%s", quantizer.summary())
    return model, tokenizer
