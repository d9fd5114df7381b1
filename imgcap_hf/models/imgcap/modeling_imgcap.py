"""ImgCap captioning models: a vision backbone followed by an LSTM decoder, with or without soft attention.

Shipped to Hub users as remote code: imports only torch, transformers and the sibling configuration file.

Reading order: the decoder state and output containers, the vision encoder (backbone -> grid of regions), the additive
attention, the two decoders (Show-Attend-Tell and Show-and-Tell), then `ImgCapForConditionalGeneration`, which wires
them into transformers' `generate()` through the encoder-decoder route: the image is encoded once, and the LSTM state
travels between steps as the `cache`.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel, ResNetModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput

from .configuration_imgcap import ImgCapConfig


class ImgCapDecoderState:
    """The recurrent state carried between decoding steps; `generate()` passes it around as the model's `cache`.

    Besides the LSTM's hidden and cell states it keeps the image-only terms (the region features and, for the attention
    decoder, their attention projection), so they are computed once per image rather than once per generated word.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        regions: torch.Tensor | None = None,
        attention_keys: torch.Tensor | None = None,
    ):
        self.hidden = hidden  # (num_layers, batch, hidden_size)
        self.cell = cell  # (num_layers, batch, hidden_size)
        self.regions = regions  # (batch, regions, feature_size)
        self.attention_keys = attention_keys  # (batch, regions, attention_size)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow beam search's choice of surviving beams.

        Only the LSTM state differs between beams. Beam search never moves a beam to another image, and all beams of
        one image share the same image terms, so `regions` and `attention_keys` need no reordering (a copy of them per
        step would cost as much as the LSTM step itself on CPU).
        """
        self.hidden = self.hidden.index_select(1, beam_idx)
        self.cell = self.cell.index_select(1, beam_idx)

    def where(self, advance: torch.Tensor, previous: "ImgCapDecoderState") -> "ImgCapDecoderState":
        """This state for the rows where `advance` (`(batch,)` bool) is True, `previous` for the others: a padding
        position of a prompt leaves its row's LSTM state as it was."""
        advance = advance.view(1, -1, 1)  # (1, batch, 1): broadcasts over layers and hidden units
        hidden = torch.where(advance, self.hidden, previous.hidden)
        cell = torch.where(advance, self.cell, previous.cell)
        return ImgCapDecoderState(hidden, cell, self.regions, self.attention_keys)


@dataclass
class ImgCapOutput(ModelOutput):
    """Output of `ImgCapForConditionalGeneration.forward`.

    Args:
        loss: mean cross-entropy over the label positions that are not -100 (when `labels` are given); with
            `num_items_in_batch`, their summed cross-entropy divided by it; smoothed with `label_smoothing`.
        logits: `(batch, steps, vocab_size)` next-word scores.
        cache: the `ImgCapDecoderState` after the last step, to continue decoding from (when `use_cache`).
        cross_attentions: attention decoder with `output_attentions=True`: a one-element tuple (one attention layer)
            holding `(batch, 1, steps, regions)` weights over the image regions; each step's weights sum to 1.
        decoder_hidden_states: with `output_hidden_states=True`: a one-element tuple with the top LSTM layer's
            `(batch, steps, hidden_size)` outputs.
        encoder_last_hidden_state: `(images, regions, feature_size)` region features, one row per image (captions
            share their image's row when `image_indices` is given).
        decoder_attentions: always `None` (an LSTM has no self-attention); present because `generate()` reads it.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: ImgCapDecoderState | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Weights used at every decoding step, with their gradient computed once per forward pass
# ---------------------------------------------------------------------------------------------------------------------


class _StepMatmul(torch.autograd.Function):
    """`inputs @ weight.T` whose backward returns the inputs' gradient and, instead of the weight's, records
    `(inputs, output gradient)` for `_GatherWeightGradient`."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, records: list) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.records = records
        return inputs @ weight.t()  # (batch, out_features)

    @staticmethod
    def backward(ctx, output_grad: torch.Tensor):
        inputs, weight = ctx.saved_tensors
        # Under autocast the output gradient is half precision while inputs and weight are float32: compute in the
        # gradient's precision, as autocast's own matmul backward does.
        ctx.records.append((inputs.to(output_grad.dtype), output_grad))
        return (output_grad @ weight.to(output_grad.dtype)).to(inputs.dtype), None, None


class _GatherWeightGradient(torch.autograd.Function):
    """Identity on a weight; its backward, which autograd runs after every step that used the weight, turns the steps'
    records into the weight's gradient with one product."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, records: list) -> torch.Tensor:
        ctx.records = records
        ctx.weight_dtype = weight.dtype
        ctx.set_materialize_grads(False)  # the steps hand back no gradient here: do not build a zero matrix
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, unused_grad: torch.Tensor | None):
        if not ctx.records:
            return None, None
        inputs, output_grads = zip(*ctx.records)
        ctx.records.clear()
        # (out_features, steps * batch) @ (steps * batch, in_features)
        weight_grad = torch.cat(output_grads).t() @ torch.cat(inputs)
        return weight_grad.to(ctx.weight_dtype), None


class _SharedStepWeight:
    """`inputs @ weight.T` for a weight that one forward pass uses at every decoding step.

    Autograd computes a weight's gradient at each use by default: for one step over a batch of B captions, an
    (out x in) matrix product whose inner dimension is only B, plus adding that full-size matrix into the running sum.
    That memory-bound work is a large part of a training step on CPU (the README's Performance section measures it).
    Here each step's backward only records its inputs and output gradient, and one product over all steps (inner
    dimension B x steps) gives the same gradient.
    """

    def __init__(self, weight: torch.Tensor):
        self.records = []
        self.weight = _GatherWeightGradient.apply(weight, self.records)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return _StepMatmul.apply(inputs, self.weight, self.records)


def _lstm_cell(
    inputs: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    input_matmul: Callable[[torch.Tensor], torch.Tensor],
    hidden_matmul: Callable[[torch.Tensor], torch.Tensor],
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nn.LSTMCell`'s arithmetic (gates in its order: input, forget, candidate, output) with its two weight products
    passed in, so that they can be `_SharedStepWeight`s."""
    gates = input_matmul(inputs) + hidden_matmul(hidden) + bias  # (batch, 4 * hidden_size)
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(cell), cell  # each (batch, hidden_size)


def _step_matmul(weight: torch.Tensor, gather_gradients: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return _SharedStepWeight(weight) if gather_gradients else partial(F.linear, weight=weight)


class _SplitLSTMCell:
    """An `nn.LSTMCell`'s step, `(inputs, (hidden, cell)) -> (hidden, cell)`, computed by `_lstm_cell` with its two
    weight products as `_step_matmul`s: in training their gradients are gathered once per pass."""

    def __init__(self, cell: nn.LSTMCell, gather_gradients: bool):
        self.input_matmul = _step_matmul(cell.weight_ih, gather_gradients)
        self.hidden_matmul = _step_matmul(cell.weight_hh, gather_gradients)
        self.bias = cell.bias_ih + cell.bias_hh  # (4 * hidden_size,)

    def __call__(self, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        return _lstm_cell(inputs, *state, self.input_matmul, self.hidden_matmul, self.bias)


class _SplitLinear:
    """`linear(inputs)` as `inputs @ weight.T + bias`, the product a `_step_matmul`."""

    def __init__(self, linear: nn.Linear, gather_gradients: bool):
        self.matmul = _step_matmul(linear.weight, gather_gradients)
        self.bias = linear.bias

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.matmul(inputs)
        return outputs if self.bias is None else outputs + self.bias


@dataclass
class _AttentionStepProducts:
    """The attention decoder's per-step layers for one forward pass (see `step_products`)."""

    cells: list[Callable]  # per layer: (inputs, (hidden, cell)) -> (hidden, cell), as `nn.LSTMCell`
    query: Callable[[torch.Tensor], torch.Tensor]  # hidden -> attention query, without bias
    output: Callable[[torch.Tensor], torch.Tensor]  # top hidden -> logits, with the output bias


def _real_positions(decoder_attention_mask: torch.Tensor | None, num_steps: int) -> torch.Tensor | None:
    """`(batch, steps)` True where `decoder_attention_mask` marks a real word, or None when every position is real.

    `generate()` passes the mask of the whole sequence so far while feeding only the newest word: its last `num_steps`
    columns are the ones for these inputs.
    """
    if decoder_attention_mask is None:
        return None
    real = decoder_attention_mask[:, -num_steps:].bool()  # (batch, steps)
    return None if bool(real.all()) else real


def _backbone_init_kwargs(vision_config) -> dict:
    """ViT-style models add a pooling head we never use (its weights would get no gradient): ask them not to."""
    model_class = MODEL_MAPPING.get(type(vision_config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def _backbone_stages(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's stages in order, where its transformers model keeps them as `encoder.stages` (ResNet, ConvNeXt,
    RegNet, ...); None for a backbone built otherwise (ViT's layers, Swin's)."""
    return getattr(getattr(backbone, "encoder", None), "stages", None)


class ImgCapVisionEncoder(nn.Module):
    """Runs the vision backbone and returns its output as a sequence of region features.

    A 4-D feature map (ResNet, ConvNeXt) is adaptive-average-pooled to a `region_grid_size` square grid; a patch-token
    backbone (ViT) keeps its patch tokens and drops the class/distillation tokens in front of them.

    With `config.trainable_encoder_stages`, the backbone runs with gradients, but its fixed stem and stages have
    `requires_grad=False` and see images that need no gradient: autograd records nothing for them (their outputs have
    no `grad_fn`), so they keep no activations, as under `torch.no_grad()`, and only the trained stages do.
    """

    main_input_name = "pixel_values"
    backbone_compiled = False  # set by `ImgCapForConditionalGeneration.compile_steps`
    # Set by `gradient_checkpointing_enable()` (with `_gradient_checkpointing_func`), through the model's
    # `_set_gradient_checkpointing`.
    gradient_checkpointing = False

    def __init__(self, config: ImgCapConfig):
        super().__init__()
        self.config = config
        self.backbone = AutoModel.from_config(config.vision_config, **_backbone_init_kwargs(config.vision_config))

    def forward(self, pixel_values: torch.FloatTensor, return_dict: bool = True, **kwargs) -> BaseModelOutput:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            got = (
                f"shape {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor) else repr(pixel_values)
            )
            raise ValueError(
                f"ImgCap needs images: `pixel_values` must be a (batch, 3, height, width) tensor, got {got}."
            )
        # The processor gives float32; a model loaded in bfloat16 or float16 reads its images in its own precision.
        # Channels-last images let oneDNN (CPU) and cuDNN (GPU) run the convolutions in their fastest layout, with the
        # same features up to float rounding.
        pixel_values = pixel_values.to(dtype=self.backbone.dtype).contiguous(memory_format=torch.channels_last)
        if self.backbone_compiled:
            torch._dynamo.maybe_mark_dynamic(pixel_values, 0)  # one graph for every batch size (see `compile_steps`)
        # A frozen backbone needs no autograd graph: that saves its activations' memory during training.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trains_encoder):
            if self.gradient_checkpointing and isinstance(self.backbone, ResNetModel) and torch.is_grad_enabled():
                features = self._checkpointed_resnet_features(pixel_values)
            else:
                features = self.backbone(pixel_values=pixel_values).last_hidden_state
        if features.dim() == 4:  # (batch, channels, height, width)
            grid = self.config.region_grid_size
            features = F.adaptive_avg_pool2d(features, (grid, grid))
            regions = features.flatten(2).transpose(1, 2)  # (batch, grid * grid, channels)
        else:  # (batch, special + patches, hidden)
            regions = features[:, -self.config.num_regions :]  # (batch, patches, hidden)
        return BaseModelOutput(last_hidden_state=regions)

    def _checkpointed_resnet_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`ResNetModel`'s last hidden state (its stem, then every residual block in order; its pooler is unused
        here), the stem and each block that trains under activation checkpointing: their inner activations are
        recomputed in the backward pass instead of being kept, which is what lets a trained ResNet-50 fit large
        batches. transformers' ResNet has no checkpointing of its own. Fixed parts (below `trainable_encoder_stages`)
        keep no activations anyway and run as they are."""
        hidden = self._checkpointed(self.backbone.embedder, pixel_values)  # (batch, embedding_size, height / 4, ...)
        for stage in self.backbone.encoder.stages:
            for block in stage.layers:
                hidden = self._checkpointed(block, hidden)
        return hidden  # (batch, channels, height / 32, width / 32)

    def _checkpointed(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """`module(hidden)` under activation checkpointing. The backward pass calls the module again to recompute its
        activations, and BatchNorm in training mode would then update its running statistics a second time with the
        same batch: that second call puts them back as they were."""
        if not any(parameter.requires_grad for parameter in module.parameters()):
            return module(hidden)  # a fixed module: nothing to recompute
        calls = 0

        def run(inputs: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return module(inputs)
            statistics = [buffer.clone() for buffer in module.buffers()]
            try:
                return module(inputs)
            finally:  # also when checkpointing stops the recomputation early, by raising, once it has what it needs
                with torch.no_grad():
                    for buffer, kept in zip(module.buffers(), statistics):
                        buffer.copy_(kept)

        return self._gradient_checkpointing_func(run, hidden)


class ImgCapAttention(nn.Module):
    """Additive (Bahdanau) attention over image regions: score_i = w^T tanh(W_r r_i + W_h h).

    This equals the published `Linear(concat(r_i, h))` with the same number of weights, split so that the region half
    `W_r r_i` (the expensive one) is computed once per image by `project_regions`.
    """

    def __init__(self, config: ImgCapConfig):
        super().__init__()
        self.region_projection = nn.Linear(config.vision_feature_size, config.attention_size)
        self.hidden_projection = nn.Linear(config.hidden_size, config.attention_size, bias=False)
        self.score = nn.Linear(config.attention_size, 1)

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        return self.region_projection(regions)  # (batch, regions, attention_size)

    def forward(
        self,
        attention_keys: torch.Tensor,
        regions: torch.Tensor,
        hidden: torch.Tensor,
        project_hidden: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context vector and attention weights; `project_hidden` replaces `hidden_projection` (the decoder passes a
        `_SharedStepWeight` of the same weight in training)."""
        query = (project_hidden or self.hidden_projection)(hidden).unsqueeze(1)  # (batch, 1, attention_size)
        scores = self.score(torch.tanh(attention_keys + query)).squeeze(-1)  # (batch, regions)
        attention_weights = scores.softmax(dim=-1)  # (batch, regions)
        context = torch.bmm(attention_weights.unsqueeze(1), regions).squeeze(1)  # (batch, feature_size)
        return context, attention_weights


class ImgCapAttentionDecoder(nn.Module):
    """Show-Attend-Tell decoder: at every step, attend over the regions with the top layer's previous hidden state
    and feed `[word embedding; context]` to a stack of LSTM cells that starts from zeros."""

    def __init__(self, config: ImgCapConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.attention = ImgCapAttention(config)
        input_sizes = [config.embedding_size + config.vision_feature_size]
        input_sizes += [config.hidden_size] * (config.num_hidden_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(size, config.hidden_size) for size in input_sizes)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)

    def initial_state(
        self, regions: torch.Tensor, image_indices: torch.LongTensor | None = None
    ) -> ImgCapDecoderState:
        """Zero LSTM state for every caption row; `image_indices` maps rows to images (see `forward`), so that the
        attention projection of each image's regions is computed once, not once per caption or beam."""
        attention_keys = self.attention.project_regions(regions)  # (images, regions, attention_size)
        if image_indices is not None:
            regions = regions.index_select(0, image_indices)  # (rows, regions, feature_size)
            attention_keys = attention_keys.index_select(0, image_indices)  # (rows, regions, attention_size)
        # Two tensors, not one shared by both: a compiled step (`compile_steps`) guards on its inputs' aliasing.
        hidden, cell = (
            regions.new_zeros(self.config.num_hidden_layers, regions.shape[0], self.config.hidden_size)
            for _ in range(2)
        )
        return ImgCapDecoderState(hidden, cell, regions, attention_keys)

    def step_products(self, gather_gradients: bool) -> _AttentionStepProducts:
        """The layers of `step`, prepared once per forward pass: with `gather_gradients` (training), each weight's
        gradient is computed once for all steps (`_SharedStepWeight`). A layer that is no longer a float `nn.LSTMCell`
        or `nn.Linear` (int8 dynamic quantization by `imgcap_hf.inference.optimize_for_cpu`) runs as it is."""

        def split(layer: nn.Module, split_class: type) -> Callable:
            return split_class(layer, gather_gradients) if isinstance(layer, (nn.LSTMCell, nn.Linear)) else layer

        return _AttentionStepProducts(
            cells=[split(cell, _SplitLSTMCell) for cell in self.cells],
            query=split(self.attention.hidden_projection, _SplitLinear),
            output=split(self.output, _SplitLinear),
        )

    def step(
        self, token_ids: torch.LongTensor, state: ImgCapDecoderState, products: _AttentionStepProducts | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ImgCapDecoderState]:
        """One word: returns logits `(batch, vocab)`, attention weights `(batch, regions)`, the top hidden state.
        `products` come from `step_products`, built once for all the steps of a forward pass."""
        products = products or self.step_products(gather_gradients=False)
        context, attention_weights = self.attention(
            state.attention_keys, state.regions, state.hidden[-1], project_hidden=products.query
        )
        layer_input = torch.cat([self.embedding(token_ids), context], dim=-1)  # (batch, embedding + feature)
        hiddens, cells = [], []
        for layer, lstm_cell in enumerate(products.cells):
            hidden, cell_state = lstm_cell(layer_input, (state.hidden[layer], state.cell[layer]))
            hiddens.append(hidden)
            cells.append(cell_state)
            layer_input = self.dropout(hidden)  # between layers, and before the output layer
        logits = products.output(layer_input)  # (batch, vocab)
        new_state = ImgCapDecoderState(torch.stack(hiddens), torch.stack(cells), state.regions, state.attention_keys)
        return logits, attention_weights, hiddens[-1], new_state

    def compilable_step(
        self,
        token_ids: torch.LongTensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        regions: torch.Tensor,
        attention_keys: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step` on tensors only, what `ImgCapForConditionalGeneration.compile_steps` compiles: its plain layers
        (autograd computes the weights' gradients inside the graph; `_SharedStepWeight`'s records live in Python).
        Returns logits, attention weights, the top hidden state and the new `(num_layers, batch, hidden_size)`
        hidden and cell states."""
        state = ImgCapDecoderState(hidden, cell, regions, attention_keys)
        logits, attention_weights, top_hidden, new_state = self.step(token_ids, state)
        return logits, attention_weights, top_hidden, new_state.hidden, new_state.cell


class ImgCapPooledDecoder(nn.Module):
    """Show-and-Tell decoder (`decoder_type="pooled"`): the image enters once, as one pooled feature that, through a
    two-layer head and a projection, is the LSTM's first input; the words follow. Sizes follow the published ImgCap
    head (Linear-ReLU-Dropout-Linear-ReLU, then Linear)."""

    def __init__(self, config: ImgCapConfig):
        super().__init__()
        self.config = config
        self.image_head = nn.Sequential(
            nn.Linear(config.vision_feature_size, config.image_head_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.image_head_size, config.image_head_size),
            nn.ReLU(),
        )
        self.image_projection = nn.Linear(config.image_head_size, config.embedding_size)
        self.image_norm = nn.LayerNorm(config.embedding_size) if config.normalize_image_input else nn.Identity()
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.lstm = nn.LSTM(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_hidden_layers,
            dropout=config.dropout if config.num_hidden_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)

    def initial_state(
        self, regions: torch.Tensor, image_indices: torch.LongTensor | None = None
    ) -> ImgCapDecoderState:
        """The LSTM state after reading the image, for every caption row (`image_indices` maps rows to images).

        The image head runs once per caption, not once per image: its dropout then draws a mask of its own for every
        caption, as the published model did, which regularises more than one mask shared by an image's five
        captions; the head is small next to the rest of a step.
        """
        # (images, feature_size): global max or average pool over the grid
        pooled = regions.amax(dim=1) if self.config.image_pooling == "max" else regions.mean(dim=1)
        if image_indices is not None:
            pooled = pooled.index_select(0, image_indices)  # (rows, feature_size)
        image_input = self.image_norm(self.image_projection(self.image_head(pooled)))  # (rows, embedding)
        _, (hidden, cell) = self.lstm(image_input.unsqueeze(1))  # each (num_layers, rows, hidden)
        return ImgCapDecoderState(hidden, cell)

    def run(
        self, token_ids: torch.LongTensor, state: ImgCapDecoderState
    ) -> tuple[torch.Tensor, torch.Tensor, ImgCapDecoderState]:
        """Any number of words in one fused LSTM call: logits `(batch, steps, vocab)`, top hiddens, new state."""
        embedded = self.embedding(token_ids)  # (batch, steps, embedding)
        top_hidden, (hidden, cell) = self.lstm(embedded, (state.hidden, state.cell))  # (batch, steps, hidden)
        logits = self.output(self.dropout(top_hidden))  # (batch, steps, vocab)
        return logits, top_hidden, ImgCapDecoderState(hidden, cell)

    def step_products(self, gather_gradients: bool) -> None:
        """`nn.LSTM` holds its own weights: nothing to prepare (see the attention decoder's `step_products`)."""
        return None

    def step(
        self, token_ids: torch.LongTensor, state: ImgCapDecoderState, products: None = None
    ) -> tuple[torch.Tensor, None, torch.Tensor, ImgCapDecoderState]:
        logits, top_hidden, state = self.run(token_ids.unsqueeze(1), state)
        return logits.squeeze(1), None, top_hidden.squeeze(1), state

    def compilable_step(
        self,
        token_ids: torch.LongTensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        lstm_weights: list[list[torch.Tensor]],
    ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step` on tensors only, what `ImgCapForConditionalGeneration.compile_steps` compiles.

        The compiler cannot trace `nn.LSTM` (touching the module breaks the graph), so this step gets the LSTM's
        `all_weights` (per layer: `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`) as an input and computes each layer
        with `_lstm_cell`, dropout between layers as `nn.LSTM` applies it: the same arithmetic, equal up to float
        rounding. Returns logits, None (no attention), the top hidden state and the new `(num_layers, batch,
        hidden_size)` hidden and cell states."""
        layer_input = self.embedding(token_ids)  # (batch, embedding)
        hiddens, cells = [], []
        for layer, (weight_ih, weight_hh, bias_ih, bias_hh) in enumerate(lstm_weights):
            if layer > 0:  # `nn.LSTM(dropout=config.dropout)` between layers
                layer_input = F.dropout(layer_input, self.config.dropout, self.training)
            layer_hidden, layer_cell = _lstm_cell(
                layer_input, hidden[layer], cell[layer], partial(F.linear, weight=weight_ih),
                partial(F.linear, weight=weight_hh), bias_ih + bias_hh,
            )  # fmt: skip
            hiddens.append(layer_hidden)  # (batch, hidden_size)
            cells.append(layer_cell)
            layer_input = layer_hidden
        logits = self.output(self.dropout(layer_input))  # (batch, vocab)
        return logits, None, layer_input, torch.stack(hiddens), torch.stack(cells)


class ImgCapPreTrainedModel(PreTrainedModel):
    config: ImgCapConfig
    config_class = ImgCapConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ImgCapAttentionDecoder", "ImgCapPooledDecoder"]
    # The backbone's activations are what fills memory when it is trained (see `ImgCapVisionEncoder`).
    supports_gradient_checkpointing = True
    # `forward` sums the loss and divides it by `num_items_in_batch` when Trainer passes it: under gradient
    # accumulation every label token then weighs the same, so the loss and the gradient equal those of one big batch.
    accepts_loss_kwargs = True

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own defaults for the decoder layers, as the published model used.

        The backbone is a `PreTrainedModel` of its own and is initialised by its own `_init_weights`; transformers
        guards these calls so that weights loaded from a checkpoint are never overwritten.
        """
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LSTM, nn.LSTMCell, nn.LayerNorm)):
            module.reset_parameters()
        elif isinstance(module, ImgCapForConditionalGeneration) and module.region_positions is not None:
            nn.init.normal_(module.region_positions, std=0.02)


class ImgCapForConditionalGeneration(ImgCapPreTrainedModel, GenerationMixin):
    """Image captioner: vision backbone + LSTM decoder (`config.decoder_type` `"attention"` or `"pooled"`).

    Example:

    ```python
    >>> from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor
    >>> model = ImgCapForConditionalGeneration.from_pretrained("outputs/shapes-attention")
    >>> processor = ImgCapProcessor.from_pretrained("outputs/shapes-attention")
    >>> inputs = processor(images=[image], return_tensors="pt")
    >>> ids = model.generate(**inputs, num_beams=5, max_new_tokens=30)
    >>> processor.batch_decode(ids, skip_special_tokens=True)
    ```
    """

    def __init__(self, config: ImgCapConfig):
        super().__init__(config)
        self.encoder = ImgCapVisionEncoder(config)
        if config.use_region_positions and config.decoder_type == "attention":
            # (regions, feature_size): tells the attention where each region lies in the image. The Show-and-Tell
            # decoder averages the regions, which would erase any position, so it has none.
            self.region_positions = nn.Parameter(torch.zeros(config.num_regions, config.vision_feature_size))
        else:
            self.region_positions = None
        if config.decoder_type == "attention":
            self.decoder = ImgCapAttentionDecoder(config)
        else:
            self.decoder = ImgCapPooledDecoder(config)
        self.compiled_step = None  # set by `compile_steps`
        self.post_init()
        self.freeze_encoder(config.freeze_encoder, config.trainable_encoder_stages)

    # ----------------------------------------------------------------------------------------------------------------
    # Encoder handling: freezing, pretrained backbones
    # ----------------------------------------------------------------------------------------------------------------

    def get_encoder(self, modality: str | None = None) -> ImgCapVisionEncoder:
        return self.encoder

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs) -> None:
        """What `gradient_checkpointing_enable()` (and `TrainingArguments(gradient_checkpointing=True)`) calls.

        The backbone is checkpointed block by block: a ResNet by `ImgCapVisionEncoder`, any other backbone by its own
        transformers implementation where it has one (ViT does). The LSTM decoder keeps its activations: they are
        small next to a trained backbone's. A frozen backbone runs without gradients and needs no checkpointing; with
        `trainable_encoder_stages`, only the blocks of the trained stages are checkpointed.
        """
        backbone = self.encoder.backbone
        if enable and not (isinstance(backbone, ResNetModel) or backbone.supports_gradient_checkpointing):
            raise ValueError(
                f"Gradient checkpointing works with ResNet backbones and those whose transformers model supports it; "
                f"{type(backbone).__name__} does not."
            )
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Word embeddings: growing the vocabulary with `resize_token_embeddings`
    # ----------------------------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        """The output layer `(hidden_size -> vocab_size)`; it is not tied to the input embeddings."""
        return self.decoder.output

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder.output = new_embeddings

    def freeze_encoder(self, frozen: bool = True, trainable_stages: int = 0) -> None:
        """Freeze (or unfreeze) the backbone: no gradients, BatchNorm statistics fixed, recorded in the config. With
        `frozen` and `trainable_stages` N > 0, its last N stages still train (see `config.trainable_encoder_stages`).
        """
        self.config.check_encoder_freezing(frozen, trainable_stages)
        stages = _backbone_stages(self.encoder.backbone)
        if trainable_stages and stages is None:
            raise ValueError(
                f"trainable_encoder_stages needs a backbone whose stages are `encoder.stages` (ResNet, ConvNeXt); "
                f"{type(self.encoder.backbone).__name__} keeps none: train all of it with freeze_encoder=False instead"
            )
        self.config.freeze_encoder, self.config.trainable_encoder_stages = frozen, trainable_stages
        self.encoder.backbone.requires_grad_(not frozen)
        for stage in self._trained_encoder_stages():
            stage.requires_grad_(True)
        self.train(self.training)

    def _trained_encoder_stages(self) -> list[nn.Module]:
        """The backbone stages that train inside a frozen backbone (`config.trainable_encoder_stages` last ones)."""
        if not self.config.trainable_encoder_stages:
            return []
        return list(_backbone_stages(self.encoder.backbone))[-self.config.trainable_encoder_stages :]

    def train(self, mode: bool = True):
        """`nn.Module.train`, except that a frozen backbone stays in eval mode: it keeps its BatchNorm running
        statistics. Stages trained inside it (`trainable_encoder_stages`) follow `mode`, but their BatchNorm layers
        stay in eval mode too: they normalise with the pretrained statistics and only their scales and shifts train.
        A captioning batch holds few images (each with several captions), which would give noisy batch statistics,
        and normalising the same way in training and evaluation keeps the trained stages' features what they were
        trained to be; fine-tuning a pretrained CNN commonly freezes them this way."""
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.backbone.eval()
            for stage in self._trained_encoder_stages():
                stage.train(mode)
                for module in stage.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then re-apply `config.freeze_encoder` and `trainable_encoder_stages`:
        loading re-creates the parameters with `requires_grad=True`, which would silently unfreeze the backbone."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_encoder(model.config.freeze_encoder, model.config.trainable_encoder_stages)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, shipping the pipelines too: config.json's `custom_pipelines` names them,
        so that `pipeline("image-captioning", model=FOLDER_OR_REPO, trust_remote_code=True)` works without our
        package. The import below is relative, so transformers copies `pipeline_imgcap.py` with this file."""
        from .pipeline_imgcap import SHIPPED_PIPELINES

        in_memory = vars(self.config).get("custom_pipelines")  # what loading kept (see ImgCapConfig.__post_init__)
        self.config.custom_pipelines = SHIPPED_PIPELINES
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if in_memory is None:
                del self.config.custom_pipelines
            else:
                self.config.custom_pipelines = in_memory

    @classmethod
    def from_vision_pretrained(
        cls, vision_model_name_or_path: str, vision_kwargs: dict | None = None, **config_kwargs
    ) -> "ImgCapForConditionalGeneration":
        """A new captioner whose backbone starts from pretrained vision weights and whose decoder is random.

        `vision_model_name_or_path` is a Hub id (e.g. `"microsoft/resnet-50"`) or a local folder of any transformers
        vision checkpoint (a classification checkpoint works: its base model is used). The weights are copied in after
        `post_init`, so weight initialisation cannot overwrite them. `config_kwargs` set the `ImgCapConfig` fields.
        The weights are read from safetensors only (a `pytorch_model.bin` is a pickle, never loaded).

        ```python
        >>> model = ImgCapForConditionalGeneration.from_vision_pretrained("microsoft/resnet-50", decoder_type="pooled")
        ```
        """
        vision_kwargs = dict(vision_kwargs or {})
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path, **vision_kwargs)
        # safetensors only: a `pytorch_model.bin` is a pickle, and unpickling what a user points at can run code.
        vision_model = AutoModel.from_pretrained(
            vision_model_name_or_path,
            **{"use_safetensors": True, **vision_kwargs},
            **_backbone_init_kwargs(vision_config),
        )
        model = cls(ImgCapConfig(vision_config=vision_model.config, **config_kwargs))
        model.encoder.backbone.load_state_dict(vision_model.state_dict())
        return model

    # ----------------------------------------------------------------------------------------------------------------
    # torch.compile of the parts whose shapes do not depend on the caption
    # ----------------------------------------------------------------------------------------------------------------

    def compile_steps(self, **compile_kwargs) -> None:
        """`torch.compile` one decoder step and the vision backbone, the parts of the forward pass whose shapes do not
        depend on the caption's length; `compile_kwargs` go to `torch.compile` (`backend`, `mode`, ...).

        Compiling the whole forward pass would trace the loop over the caption's words into the graph: a new graph
        for every caption length. Here one compiled step serves every word of every caption, in training and in
        `generate()` (greedy, sampling and beam search alike), and the batch dimension of its inputs and of the images
        is marked dynamic, so that a last partial batch or another number of beams reuses the same graph. The graphs
        are then bounded by the modes and a few size classes, not by the data: a step in training (the attention
        decoder's two: the first word, whose zero state needs no gradient, and the others), a step in evaluation,
        the backbone with and without gradients; a batch of one row is a graph of its own (the compiler specialises
        sizes 0 and 1), and on CPU the backbone's convolutions tell batches below 16 images from larger ones.

        In training the compiled step gets its weights' gradients from autograd at every word instead of gathering
        them once per pass (`_SharedStepWeight`). Dropout inside a compiled step draws its masks from the compiler's
        random numbers: the same distribution as eager mode, not the same draws. The Show-and-Tell decoder's
        whole-caption `nn.LSTM` call (teacher forcing 1) stays as it is.
        """
        # fullgraph: one step is one graph, or an error that says where it breaks.
        self.compiled_step = torch.compile(self.decoder.compilable_step, **{"fullgraph": True, **compile_kwargs})
        # In place: the backbone stays the same module, with the same state_dict keys.
        self.encoder.backbone.compile(**compile_kwargs)
        self.encoder.backbone_compiled = True

    def _run_compiled_step(
        self, token_ids: torch.LongTensor, state: ImgCapDecoderState
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, ImgCapDecoderState]:
        """`decoder.step` through `compiled_step`.

        A graph guards on its inputs' sizes and strides. The batch dimension is marked dynamic. The word ids are
        copied into a tensor of their own: a column of the `(batch, steps)` captions has a stride of `steps`, which
        the compiler specialises for a batch of one row (sizes 0 and 1 are never dynamic), where each caption length
        would be a graph again. The image terms are made contiguous once (the encoder's regions are a transposed
        view), then carried in the state.
        """
        token_ids = token_ids.clone(memory_format=torch.contiguous_format)  # (batch,)
        inputs = [(token_ids, 0), (state.hidden, 1), (state.cell, 1)]  # each with its batch dimension
        regions, attention_keys = state.regions, state.attention_keys
        if self.config.decoder_type == "attention":
            regions, attention_keys = regions.contiguous(), attention_keys.contiguous()  # no copy once contiguous
            inputs += [(regions, 0), (attention_keys, 0)]
        for tensor, batch_dim in inputs:
            torch._dynamo.maybe_mark_dynamic(tensor, batch_dim)
        arguments = [tensor for tensor, _ in inputs]
        if self.config.decoder_type == "pooled":
            arguments.append(self.decoder.lstm.all_weights)  # see `ImgCapPooledDecoder.compilable_step`
        logits, attention_weights, top_hidden, hidden, cell = self.compiled_step(*arguments)
        new_state = ImgCapDecoderState(hidden, cell, regions, attention_keys)
        return logits, attention_weights, top_hidden, new_state

    # ----------------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------------

    def prepare_decoder_input_ids_from_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        """`<sos>` followed by the labels without their last position; ignored (-100) positions become `<pad>`."""
        decoder_input_ids = labels.new_full(labels.shape, self.config.pad_token_id)
        decoder_input_ids[:, 1:] = labels[:, :-1]
        decoder_input_ids[:, 0] = self.config.decoder_start_token_id
        return decoder_input_ids.masked_fill(decoder_input_ids == -100, self.config.pad_token_id)

    def _initial_state(
        self, regions: torch.Tensor, image_indices: torch.LongTensor | None = None
    ) -> ImgCapDecoderState:
        if self.region_positions is not None:
            regions = regions + self.region_positions  # (images, regions, feature_size)
        return self.decoder.initial_state(regions, image_indices)

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: ImgCapDecoderState | None = None,
        use_cache: bool | None = None,
        teacher_forcing_ratio: float | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        image_indices: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        **kwargs,
    ) -> ImgCapOutput | tuple:
        r"""
        Args:
            pixel_values: `(batch, 3, height, width)` images, as `ImgCapImageProcessor` prepares them.
            decoder_input_ids: `(batch, steps)` words fed to the decoder, starting with `<sos>`. Built from `labels`
                when omitted.
            labels: `(batch, steps)` the next word at every step; -100 marks positions to ignore.
            encoder_outputs: region features from `get_encoder()` (or a feature cache) instead of `pixel_values`.
            cache: decoder state from a previous call; the image is then not looked at again.
            teacher_forcing_ratio: training only; probability of feeding the true previous word rather than the model's
                own prediction (scheduled sampling). Defaults to `config.teacher_forcing_ratio`.
            decoder_attention_mask: `(batch, steps)` or longer (then its last `steps` columns count): 0 marks padding,
                which leaves the row's LSTM state unchanged, so left-padded prompts of different lengths continue
                exactly as each would alone (logits at padding positions mean nothing). Right padding needs no mask:
                an LSTM never looks ahead, so it cannot change the positions that count.
            image_indices: `(captions,)` for each caption row, the row of its image in `pixel_values` /
                `encoder_outputs`. Lets one encoder pass serve all captions of an image (Flickr30k has five).
            num_items_in_batch: the number of label tokens (not -100) over all micro-batches of one optimizer step,
                which Trainer passes under gradient accumulation: the loss is then the sum over this batch's tokens
                divided by it, and the micro-batches' losses add up to the mean over all their tokens.
            label_smoothing: training only; the loss at each label position becomes `(1 - label_smoothing)` times
                the cross-entropy of the label plus `label_smoothing` times the mean cross-entropy over the whole
                vocabulary (positions at -100 still count for nothing). 0 is the plain cross-entropy.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = bool(output_attentions)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError(
                    "Pass `decoder_input_ids` or `labels` (the captions) to the forward pass (Trainer's "
                    "label_smoothing_factor takes the labels away: have the processor add them with "
                    "return_decoder_input_ids=True)."
                )
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if teacher_forcing_ratio is None:
            teacher_forcing_ratio = self.config.teacher_forcing_ratio

        if cache is None:
            if encoder_outputs is None:
                if pixel_values is None:
                    raise ValueError("Pass `pixel_values` or `encoder_outputs` (the image) to the forward pass.")
                encoder_outputs = self.encoder(pixel_values)
            regions = encoder_outputs[0].to(self.dtype)  # (images, regions, feature_size), e.g. a float32 cache
            state = self._initial_state(regions, image_indices)
        else:
            regions = None
            state = cache

        scheduled_sampling = self.training and teacher_forcing_ratio < 1.0
        real_positions = _real_positions(decoder_attention_mask, decoder_input_ids.shape[1])
        if self.config.decoder_type == "pooled" and not scheduled_sampling and real_positions is None:
            # Every input word is known: one fused cuDNN/oneDNN LSTM call over the whole caption.
            logits, top_hidden, state = self.decoder.run(decoder_input_ids, state)
            attention_weights = None
        else:
            logits, attention_weights, top_hidden, state = self._decode_step_by_step(
                decoder_input_ids, state, teacher_forcing_ratio if scheduled_sampling else 1.0, real_positions
            )

        loss = None
        if labels is not None:
            flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten()  # (batch * steps, vocab), (...)
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=label_smoothing)
            else:
                summed = F.cross_entropy(
                    flat_logits, flat_labels, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing
                )
                loss = summed / num_items_in_batch

        output = ImgCapOutput(
            loss=loss,
            logits=logits,
            cache=state if use_cache is not False else None,
            cross_attentions=(attention_weights.unsqueeze(1),)
            if output_attentions and attention_weights is not None
            else None,
            decoder_hidden_states=(top_hidden,) if output_hidden_states else None,
            encoder_last_hidden_state=regions,
        )
        return output if return_dict else output.to_tuple()

    def _decode_step_by_step(
        self,
        decoder_input_ids: torch.LongTensor,
        state: ImgCapDecoderState,
        teacher_forcing_ratio: float,
        real_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, ImgCapDecoderState]:
        """Run the decoder one word at a time (the attention decoder always; the pooled decoder under scheduled
        sampling or with padding to skip). With `teacher_forcing_ratio < 1`, each caption's input at step t > 0 is,
        with probability `1 - ratio`, the model's own greedy prediction from step t - 1 instead of the true word.
        `real_positions` `(batch, steps)` is False at padding, where a row keeps its state."""
        batch_size, num_steps = decoder_input_ids.shape
        if teacher_forcing_ratio < 1.0:
            use_truth = torch.rand(batch_size, num_steps, device=decoder_input_ids.device) < teacher_forcing_ratio
        if self.compiled_step is not None:
            step = self._run_compiled_step
        else:
            # A compiled graph keeps autograd's own weight gradients (`_SharedStepWeight` keeps Python-side records).
            gather_gradients = torch.is_grad_enabled() and not torch.compiler.is_compiling()
            step = partial(self.decoder.step, products=self.decoder.step_products(gather_gradients))
        step_logits, step_attention_weights, step_hiddens = [], [], []
        previous_prediction = None
        for t in range(num_steps):
            token_ids = decoder_input_ids[:, t]  # (batch,)
            if previous_prediction is not None and teacher_forcing_ratio < 1.0:
                token_ids = torch.where(use_truth[:, t], token_ids, previous_prediction)
            logits, attention_weights, top_hidden, new_state = step(token_ids, state)
            state = new_state if real_positions is None else new_state.where(real_positions[:, t], state)
            previous_prediction = logits.detach().argmax(dim=-1)
            step_logits.append(logits)
            step_attention_weights.append(attention_weights)
            step_hiddens.append(top_hidden)
        logits = torch.stack(step_logits, dim=1)  # (batch, steps, vocab)
        top_hidden = torch.stack(step_hiddens, dim=1)  # (batch, steps, hidden)
        attention_weights = (
            torch.stack(step_attention_weights, dim=1) if step_attention_weights[0] is not None else None
        )  # (batch, steps, regions)
        return logits, attention_weights, top_hidden, state

    # ----------------------------------------------------------------------------------------------------------------
    # Generation hooks
    # ----------------------------------------------------------------------------------------------------------------

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
    ):
        """Beam search (and sampling several captions per image) runs `expand_size` decoder rows per image.

        transformers would copy each image's region features that many times, and the first step would then project
        every copy for attention. Instead, keep one copy per image and let `image_indices` spread the first step's
        decoder state over the rows (row r belongs to image r // expand_size, the order beam search uses).
        """
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, False, input_ids, **model_kwargs)
        if encoder_outputs is not None and expand_size > 1 and model_kwargs.get("image_indices") is None:
            regions = encoder_outputs[0]  # (images, regions, feature_size)
            model_kwargs["image_indices"] = torch.arange(regions.shape[0], device=regions.device).repeat_interleave(
                expand_size
            )  # (images * expand_size,)
        model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ):
        """`GenerationMixin.generate`, after checking what only a captioner can get wrong: that there is an image,
        and that a caption prefix (`decoder_input_ids`, left-padded with `decoder_attention_mask` when prefixes differ
        in length) does not already hold `<eos>`, which `tokenizer(prefix)` appends. `ImgCapProcessor(images=...,
        prefix=...)` builds such prompts."""
        if inputs is None and kwargs.get("pixel_values") is None and kwargs.get("encoder_outputs") is None:
            raise ValueError(
                "generate() needs an image: pass `pixel_values` (from the processor) or `encoder_outputs`."
            )
        prompt = kwargs.get("decoder_input_ids")
        if prompt is not None:
            ends = prompt == self.config.eos_token_id  # (batch, prompt_length)
            if kwargs.get("decoder_attention_mask") is not None:
                ends &= kwargs["decoder_attention_mask"].bool()
            if bool(ends.any()):
                row = int(ends.any(dim=1).nonzero()[0])
                raise ValueError(
                    f"decoder_input_ids row {row} holds <eos> (id {self.config.eos_token_id}), which would end the "
                    "caption inside its prefix: build prompts with processor(images=..., prefix=...), or drop the "
                    "last token of tokenizer(prefix)."
                )
        return super().generate(inputs, generation_config, **kwargs)

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        """transformers' merge of the saved `generation_config.json`, a passed `generation_config` and keyword
        arguments, except that a length the caller asks for wins over a saved length of the other kind: transformers
        lets a saved `max_new_tokens` override the caller's `max_length` (Seq2SeqTrainer's `generation_max_length`),
        and a saved `min_new_tokens` the caller's `min_length`."""
        merged, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        # The caller's most direct setting decides: keyword arguments, else the `generation_config` they pass.
        asked_in = [kwargs, generation_config.to_dict() if generation_config is not None else {}]
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            source = next(
                (given for given in asked_in if given.get(total) is not None or given.get(new) is not None), {}
            )
            if source.get(total) is not None and source.get(new) is None:
                setattr(merged, new, None)
        return merged, model_kwargs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """The LSTM state is not a key/value cache: generate() must not create a `DynamicCache` for it."""
        return False


__all__ = ["ImgCapForConditionalGeneration", "ImgCapPreTrainedModel", "ImgCapDecoderState", "ImgCapOutput"]
