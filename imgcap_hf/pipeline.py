"""`pipeline("image-captioning", model=...)`: transformers 5 dropped the image-to-text pipeline task, so we bring one.

Importing `imgcap_hf` registers the task for any model, with the tokenizer checked against the model when the
pipeline is built (`check_processor_matches_model`): a tokenizer that does not belong to the model is refused. The
pipeline itself is the one shipped with every saved model (`models/imgcap/pipeline_imgcap.py`), which Hub users get
with `trust_remote_code=True` and no import: it accepts what `load_image` accepts (paths, bytes, PIL images in any
mode) and http(s) URLs, and returns `[{"generated_text": caption}, ...]` per image, like the old task did. A file
that is not a usable image raises `load_image`'s one-sentence `ValueError`. Pickled weights are never unpickled:
torch's `weights_only` loading (the default of transformers 5) refuses them; pass
`model_kwargs={"use_safetensors": True}` to refuse any folder without safetensors weights before it is opened.

    >>> import imgcap_hf
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-captioning", model="outputs/shapes-attention")
    >>> captioner("examples/shapes_test_00.png", num_beams=5)
    [{'generated_text': 'a large red circle on the left .'}]
"""

from __future__ import annotations

from transformers import AutoModelForImageTextToText
from transformers.pipelines import PIPELINE_REGISTRY

from .loading import check_processor_matches_model
from .models.imgcap import pipeline_imgcap

TASK = "image-captioning"


class ImgCapCaptioningPipeline(pipeline_imgcap.ImgCapCaptioningPipeline):
    """The shipped captioning pipeline, refusing a tokenizer that does not belong to an ImgCap model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model.config, "model_type", None) == "imgcap":
            check_processor_matches_model(self.tokenizer, self.model.config, label=repr(self.model.name_or_path))


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=ImgCapCaptioningPipeline, pt_model=AutoModelForImageTextToText
)
