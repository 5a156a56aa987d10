"""llava_stf: LLaVA-1.5-class models whose vision tokens are compressed before the LLM (LLaVA-STF and peers).

Importing the package registers the ``llava_stf`` model type with transformers' Auto classes.
"""

from .model import (
    PROJECTORS,
    LlavaStfConfig,
    LlavaStfForConditionalGeneration,
    LlavaStfProcessor,
)

__version__ = "0.1.0"

__all__ = ["PROJECTORS", "LlavaStfConfig", "LlavaStfForConditionalGeneration", "LlavaStfProcessor", "__version__"]
