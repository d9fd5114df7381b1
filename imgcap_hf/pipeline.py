"""`pipeline("image-captioning", model=...)`: transformers 5 dropped the image-to-text pipeline task, so we bring one.

Importing `imgcap_hf` registers the task; it accepts what `load_image` accepts (paths, bytes, PIL images in any mode)
and returns `[{"generated_text": caption}]` per image, like the old task did. A file that is not a usable image
raises `load_image`'s one-sentence `ValueError`; a tokenizer that does not belong to the model is refused when the
pipeline is built (`check_processor_matches_model`). Pickled weights are never unpickled: torch's `weights_only`
loading (the default of transformers 5) refuses them; pass `model_kwargs={"use_safetensors": True}` to refuse any
folder without safetensors weights before it is opened.

    >>> import imgcap_hf
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-captioning", model="outputs/shapes-attention")
    >>> captioner("examples/shapes_test_00.png", num_beams=5)
    [{'generated_text': 'a large red circle on the left .'}]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .loading import check_processor_matches_model
from .models.imgcap.image_processing_imgcap import load_image

TASK = "image-captioning"
GENERATION_ARGUMENTS = ("num_beams", "max_new_tokens", "length_penalty", "do_sample", "temperature", "top_p", "top_k")


class ImgCapCaptioningPipeline(Pipeline):
    """Caption images with an ImgCap model (or any image-to-text model whose `generate` takes `pixel_values`)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model.config, "model_type", None) == "imgcap":
            check_processor_matches_model(self.tokenizer, self.model.config, label=repr(self.model.name_or_path))

    def _sanitize_parameters(self, generate_kwargs: dict[str, Any] | None = None, **kwargs):
        """Generation settings may come as keywords (`num_beams=5`) or as one `generate_kwargs` mapping."""
        forward_kwargs = dict(generate_kwargs or {})
        for name in GENERATION_ARGUMENTS:
            if name in kwargs:
                forward_kwargs[name] = kwargs.pop(name)
        if kwargs:
            raise TypeError(f"Unexpected arguments for the captioning pipeline: {sorted(kwargs)}")
        return {}, forward_kwargs, {}

    def preprocess(self, image) -> dict[str, Any]:
        if isinstance(image, (str, Path, bytes)):
            image = load_image(image, min_side=getattr(self.image_processor, "load_min_side", None))
        return self.image_processor(image, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs) -> dict[str, Any]:
        return {"sequences": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, str]]:
        texts = self.tokenizer.batch_decode(model_outputs["sequences"], skip_special_tokens=True)
        return [{"generated_text": text} for text in texts]


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=ImgCapCaptioningPipeline, pt_model=AutoModelForImageTextToText
)
