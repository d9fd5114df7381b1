"""ImgCap model configuration.

Shipped to Hub users as remote code: imports only transformers (and huggingface_hub, which it depends on).
"""

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.utils.hub import TRANSFORMERS_DYNAMIC_MODULE_NAME

# Earlier names of decoder types, still read from saved configs, recipes and command lines: both decoders are LSTMs,
# and what sets the Show-and-Tell one apart is that the image enters as one pooled vector.
DECODER_TYPE_ALIASES = {"lstm": "pooled"}


def canonical_decoder_type(decoder_type: str) -> str:
    """The current name of `decoder_type` (`"lstm"` -> `"pooled"`); any other value is returned as it is."""
    return DECODER_TYPE_ALIASES.get(decoder_type, decoder_type)


@strict
class ImgCapConfig(PreTrainedConfig):
    r"""
    Configuration of an ImgCap captioner: a vision backbone (any transformers vision model) followed by an LSTM
    decoder, with or without soft attention over the backbone's grid of image regions.

    The defaults reproduce the published ImgCap sizes: a ResNet-50 encoder (frozen, 7x7x2048 region grid), a 2-layer
    LSTM with hidden and embedding size 1024, dropout 0.5, and a 4,096-word vocabulary.

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Configuration of the image encoder. Any transformers vision model whose base model returns a 4-D feature
            map (ResNet, ConvNeXt, ...) or a sequence of patch tokens (ViT, DeiT, ...). Defaults to `ResNetConfig()`,
            the ResNet-50 architecture. A dict with another `model_type` (e.g. `{"model_type": "vit"}`) resolves to
            that model's config.
        decoder_type (`str`, *optional*, defaults to `"attention"`):
            `"attention"`: soft (Bahdanau) attention over the region grid at every step, its context concatenated with
            the word embedding (Show, Attend and Tell). `"pooled"`: the image enters once, as one pooled vector
            projected and fed as the first LSTM step (Show and Tell). Both decoders are LSTMs; `"lstm"`, the name
            older configs use for `"pooled"`, is read as `"pooled"`.
        vocab_size (`int`, *optional*, defaults to 4096):
            Number of tokens of the word vocabulary (must match the tokenizer).
        embedding_size (`int`, *optional*, defaults to 1024):
            Size of the word embeddings.
        hidden_size (`int`, *optional*, defaults to 1024):
            Size of the LSTM hidden state.
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Number of stacked LSTM layers.
        dropout (`float`, *optional*, defaults to 0.5):
            Dropout between LSTM layers, after the top layer and in the image head.
        attention_size (`int`, *optional*, defaults to 1024):
            Size of the additive attention's hidden layer (`"attention"` decoder only).
        image_head_size (`int`, *optional*, defaults to 1024):
            Width of the two-layer image head that maps the pooled feature to the first LSTM input (`"pooled"` decoder
            only).
        image_pooling (`str`, *optional*, defaults to `"mean"`):
            `"pooled"` decoder only: how the region grid becomes one image vector, `"mean"` (global average pooling, as
            published) or `"max"` (keeps a small object's features from being averaged away by the background).
        normalize_image_input (`bool`, *optional*, defaults to `False`):
            `"pooled"` decoder only: a LayerNorm on the image's first-step input. Without it, a decoder trained with an
            encoder that starts from random weights can learn to blow that input up until the LSTM gates saturate and
            every image gives the same state (the image is then ignored). Off in the published configuration, whose
            encoder is pretrained.
        region_grid_size (`int`, *optional*, defaults to 7):
            A 4-D feature map is adaptive-average-pooled to `region_grid_size x region_grid_size` regions. Patch-token
            backbones keep their own patch grid.
        use_region_positions (`bool`, *optional*, defaults to `False`):
            Add a learned position embedding to every region feature. The pooled grid carries no position information
            of its own, so captions that say "left" or "right" need this. Off in the published configuration.
        freeze_encoder (`bool`, *optional*, defaults to `True`):
            Keep the image encoder's weights fixed (all of them, or all below its `trainable_encoder_stages` last
            stages): the fixed part runs without gradients and with its BatchNorm in eval mode. `False`: the whole
            encoder trains, its BatchNorm statistics included (as when it starts from random weights).
        trainable_encoder_stages (`int`, *optional*, defaults to 0):
            With `freeze_encoder`, the number of the backbone's last stages that still train (fine-tuning a
            pretrained backbone from the top down); its stem and earlier stages stay fixed and keep no activations for
            the backward pass. Every BatchNorm layer of the backbone keeps its running statistics, the trained stages'
            included (their scales and shifts train). Needs a backbone built of stages (ResNet's and ConvNeXt's
            `vision_config.depths` count them); 0 keeps the whole backbone fixed.
        teacher_forcing_ratio (`float`, *optional*, defaults to 1.0):
            Probability, per step and caption, of feeding the ground-truth previous word during training; otherwise
            the model's own previous prediction is fed (scheduled sampling). The published recipe used 0.9.
        unk_token_id, pad_token_id, bos_token_id, eos_token_id, decoder_start_token_id (`int`, *optional*):
            Special token ids, defaulting to the tokenizer's layout `<unk>`=0, `<pad>`=1, `<sos>`=2, `<eos>`=3.
            Decoding starts from `<sos>`.

    Example:

    ```python
    >>> from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration
    >>> config = ImgCapConfig(decoder_type="pooled")  # ResNet-50 + 2x1024 LSTM, as published
    >>> model = ImgCapForConditionalGeneration(config)
    >>> tiny = ImgCapConfig(
    ...     vision_config={"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32]},
    ...     hidden_size=32, embedding_size=16, attention_size=16, vocab_size=64,
    ... )
    ```
    """

    model_type = "imgcap"
    decoder_types: ClassVar[tuple[str, ...]] = ("attention", "pooled")
    image_poolings: ClassVar[tuple[str, ...]] = ("mean", "max")
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    vision_config: PreTrainedConfig | dict | None = None
    decoder_type: str = "attention"
    vocab_size: int = 4096
    embedding_size: int = 1024
    hidden_size: int = 1024
    num_hidden_layers: int = 2
    dropout: float = 0.5
    attention_size: int = 1024
    image_head_size: int = 1024
    image_pooling: str = "mean"
    normalize_image_input: bool = False
    region_grid_size: int = 7
    use_region_positions: bool = False
    freeze_encoder: bool = True
    trainable_encoder_stages: int = 0
    teacher_forcing_ratio: float = 1.0
    unk_token_id: int = 0
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 3
    decoder_start_token_id: int = 2
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        """Older decoder names (`"lstm"`) take their current name before anything validates or builds from them."""
        self.decoder_type = canonical_decoder_type(self.decoder_type)
        super().__post_init__(**kwargs)
        if "custom_pipelines" in vars(self) and not type(self).__module__.startswith(TRANSFORMERS_DYNAMIC_MODULE_NAME):
            # config.json's `custom_pipelines` makes `pipeline()` build the shipped pipelines as remote code, asking
            # for `trust_remote_code`. Where this class comes from our installed package, the package registers
            # `image-captioning` itself, so `pipeline("image-captioning", model=FOLDER)` needs no remote code.
            shipped = self.custom_pipelines
            self.custom_pipelines = {task: spec for task, spec in shipped.items() if task != "image-captioning"}

    def validate_decoder_type(self):
        """Reject an unknown decoder before any weights are built from it."""
        if self.decoder_type not in self.decoder_types:
            raise ValueError(f"decoder_type must be one of {self.decoder_types}, got {self.decoder_type!r}")
        if self.image_pooling not in self.image_poolings:
            raise ValueError(f"image_pooling must be one of {self.image_poolings}, got {self.image_pooling!r}")

    def validate_sizes(self):
        """Positive sizes and probabilities in range: a typo here would otherwise surface as a shape error."""
        sizes = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "attention_size")
        for name in (*sizes, "image_head_size", "region_grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.teacher_forcing_ratio <= 1.0:
            raise ValueError(f"teacher_forcing_ratio must be in [0, 1], got {self.teacher_forcing_ratio}")
        special_ids = (self.unk_token_id, self.pad_token_id, self.bos_token_id, self.eos_token_id)
        if any(not 0 <= token_id < self.vocab_size for token_id in special_ids):
            raise ValueError(f"special token ids {special_ids} must lie inside the vocabulary of {self.vocab_size}")

    def validate_encoder_freezing(self):
        """The trained stages lie inside a frozen backbone that has that many stages."""
        self.check_encoder_freezing(self.freeze_encoder, self.trainable_encoder_stages)

    def check_encoder_freezing(self, freeze_encoder: bool, trainable_encoder_stages: int) -> None:
        """Raise `ValueError` unless `freeze_encoder` and `trainable_encoder_stages` make sense together for this
        backbone (`ImgCapForConditionalGeneration.freeze_encoder` checks its arguments with it before applying
        them)."""
        if isinstance(trainable_encoder_stages, bool) or trainable_encoder_stages < 0:
            raise ValueError(f"trainable_encoder_stages must be an integer >= 0, got {trainable_encoder_stages!r}")
        if trainable_encoder_stages == 0:
            return
        if not freeze_encoder:
            raise ValueError(
                f"trainable_encoder_stages={trainable_encoder_stages} needs freeze_encoder=True (frozen below those "
                "stages): with freeze_encoder=False the whole encoder trains already"
            )
        num_stages = len(getattr(self.vision_config, "depths", None) or [])
        if num_stages == 0:
            raise ValueError(
                f"trainable_encoder_stages needs a backbone built of stages (ResNet, ConvNeXt); "
                f"{self.vision_config.model_type} has none: train all of it with freeze_encoder=False instead"
            )
        if trainable_encoder_stages > num_stages:
            raise ValueError(
                f"trainable_encoder_stages must be at most {num_stages}, the number of stages of the "
                f"{self.vision_config.model_type} backbone, got {trainable_encoder_stages}"
            )

    @property
    def trains_encoder(self) -> bool:
        """Whether any part of the backbone trains (its features then change from step to step)."""
        return not self.freeze_encoder or self.trainable_encoder_stages > 0

    @property
    def vision_feature_size(self) -> int:
        """Channels of one image region as the backbone outputs them (2048 for ResNet-50)."""
        hidden_sizes = getattr(self.vision_config, "hidden_sizes", None)
        if hidden_sizes:
            return int(hidden_sizes[-1])
        return int(self.vision_config.hidden_size)

    @property
    def num_regions(self) -> int:
        """Number of image regions the decoder attends over (49 for the default 7x7 grid)."""
        patch_size = getattr(self.vision_config, "patch_size", None)
        if patch_size is not None and getattr(self.vision_config, "hidden_sizes", None) is None:
            image_size = self.vision_config.image_size
            return (image_size // patch_size) ** 2
        return self.region_grid_size**2


__all__ = ["ImgCapConfig", "canonical_decoder_type"]
