"""Lynx's parts, one file each: vision encoder, resampler, adapters, the composed model, checkpoint loading."""
import logging

# torchao 0.18 (quantize:) registers two Enum classes as pytree constants, which torch 2.14 now handles by itself,
# and torch logs a deprecation line for each as soon as transformers imports torchao. Those two lines only are kept
# off the run's output; anything else torch's pytree module logs still shows. The filter is in place before torch is
# imported (the lynx package imports this one first), since transformers may import torchao before any model code.
TORCHAO_ENUMS = ("<enum 'KernelPreference'>", "<enum 'ScaleCalculationMode'>")


class TorchaoEnumNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(TORCHAO_ENUMS) and "Calling register_constant() on Enum subclasses" in message)


logging.getLogger("torch.utils._pytree").addFilter(TorchaoEnumNotices())
