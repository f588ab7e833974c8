"""Lynx's parts, one file each: vision encoder, resampler, adapters, the composed model, checkpoint loading."""
import logging

# torchao 0.18 (quantize:) registers two Enum classes that torch 2.14 now handles by itself, and torch logs a
# deprecation line for each when transformers imports torchao. Harmless; kept off the run's output.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
