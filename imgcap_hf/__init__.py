"""ImgCap-HF: CNN + LSTM image captioners (with and without soft attention) native to Hugging Face.

Importing the package registers the classes with transformers' Auto classes, and marks them for `auto_map`, so that
`save_pretrained` writes a folder that loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from .configuration_imgcap import ImgCapConfig
from .modeling_imgcap import ImgCapForConditionalGeneration, ImgCapPreTrainedModel

AutoConfig.register(ImgCapConfig.model_type, ImgCapConfig, exist_ok=True)
AutoModelForImageTextToText.register(ImgCapConfig, ImgCapForConditionalGeneration, exist_ok=True)
ImgCapConfig.register_for_auto_class()
ImgCapForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["ImgCapConfig", "ImgCapForConditionalGeneration", "ImgCapPreTrainedModel"]
