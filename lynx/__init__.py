"""Running Lynx: a Python API (`LynxPipeline`) and the loop that answers whole test files.

`LynxPipeline` is imported on first use, so the torch-free modules of this package (the resumable run, the
processes) load in a moment and generate.py checks its input before torch is imported.
"""

import models  # noqa: F401  (first: its filter keeps torchao's two import notices off the output; torch-free)

__all__ = ["LynxPipeline"]


def __getattr__(name: str):
    if name == "LynxPipeline":
        from lynx.pipeline import LynxPipeline

        return LynxPipeline
    raise AttributeError(f"module 'lynx' has no attribute {name!r}")
