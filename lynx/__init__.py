"""Running Lynx: a Python API (`LynxPipeline`) and the loop that answers whole test files."""
from lynx.pipeline import LynxPipeline

__all__ = ["LynxPipeline"]
