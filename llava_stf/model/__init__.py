"""Model code: config, model, processor and projectors. Pure ``nn.Module`` code; knows nothing of training.

Importing this package registers ``llava_stf`` and ``llava_stf_next`` (AnyRes) with transformers' ``AutoConfig``,
``AutoModelForImageTextToText`` and ``AutoProcessor``, so ``from_pretrained`` works without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_llava_stf import LlavaStfConfig
from .configuration_llava_stf_next import LlavaStfNextConfig
from .modeling_llava_stf import LlavaStfForConditionalGeneration, LlavaStfModel, build_projector
from .modeling_llava_stf_next import LlavaStfNextForConditionalGeneration, LlavaStfNextModel, generation_class
from .processing_llava_stf import LlavaStfProcessor
from .processing_llava_stf_next import LlavaStfNextProcessor
from .projectors import PROJECTORS, get_projector_class

AutoConfig.register(LlavaStfConfig.model_type, LlavaStfConfig, exist_ok=True)
AutoModel.register(LlavaStfConfig, LlavaStfModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaStfConfig, LlavaStfForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlavaStfConfig, LlavaStfProcessor, exist_ok=True)
# Same state-dict layout as transformers' LLaVA: legacy llava-hf keys (``language_model.model.*``, top-level
# ``multi_modal_projector.*``) are renamed on load, and saves use the llava-hf layout.
register_checkpoint_conversion_mapping("llava_stf", get_checkpoint_conversion_mapping("llava"), overwrite=True)
register_checkpoint_conversion_mapping("LlavaStfModel", get_checkpoint_conversion_mapping("LlavaModel"), overwrite=True)
# AnyRes (LLaVA-NeXT): llava-hf ``llava-v1.6-*`` layouts, legacy keys included (``image_newline`` at the top level).
AutoConfig.register(LlavaStfNextConfig.model_type, LlavaStfNextConfig, exist_ok=True)
AutoModel.register(LlavaStfNextConfig, LlavaStfNextModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaStfNextConfig, LlavaStfNextForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlavaStfNextConfig, LlavaStfNextProcessor, exist_ok=True)
register_checkpoint_conversion_mapping(
    "llava_stf_next", get_checkpoint_conversion_mapping("llava_next"), overwrite=True
)
register_checkpoint_conversion_mapping(
    "LlavaStfNextModel", get_checkpoint_conversion_mapping("LlavaModel"), overwrite=True
)

__all__ = [
    "PROJECTORS",
    "LlavaStfConfig",
    "LlavaStfForConditionalGeneration",
    "LlavaStfModel",
    "LlavaStfNextConfig",
    "LlavaStfNextForConditionalGeneration",
    "LlavaStfNextModel",
    "LlavaStfNextProcessor",
    "LlavaStfProcessor",
    "build_projector",
    "generation_class",
    "get_projector_class",
]
