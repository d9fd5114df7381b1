"""ImgCap-HF: CNN + LSTM image captioners (with and without soft attention) native to Hugging Face.

Importing the package registers the classes with transformers' Auto classes, and marks them for `auto_map`, so that
`save_pretrained` writes a folder that loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .models.imgcap.configuration_imgcap import ImgCapConfig
from .models.imgcap.image_processing_imgcap import ImgCapImageProcessor, load_image, to_rgb_image
from .models.imgcap.modeling_imgcap import ImgCapForConditionalGeneration, ImgCapPreTrainedModel
from .models.imgcap.processing_imgcap import ImgCapProcessor
from .models.imgcap.tokenization_imgcap import ImgCapTokenizer
from .pipeline import ImgCapCaptioningPipeline

AutoConfig.register(ImgCapConfig.model_type, ImgCapConfig, exist_ok=True)
AutoModelForImageTextToText.register(ImgCapConfig, ImgCapForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ImgCapConfig, slow_tokenizer_class=ImgCapTokenizer, exist_ok=True)
AutoImageProcessor.register(ImgCapConfig, slow_image_processor_class=ImgCapImageProcessor, exist_ok=True)
AutoProcessor.register(ImgCapConfig, ImgCapProcessor, exist_ok=True)
ImgCapConfig.register_for_auto_class()
ImgCapForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
ImgCapTokenizer.register_for_auto_class("AutoTokenizer")
ImgCapImageProcessor.register_for_auto_class("AutoImageProcessor")
ImgCapProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ImgCapCaptioningPipeline",
    "ImgCapConfig",
    "ImgCapForConditionalGeneration",
    "ImgCapImageProcessor",
    "ImgCapPreTrainedModel",
    "ImgCapProcessor",
    "ImgCapTokenizer",
    "load_image",
    "to_rgb_image",
]
