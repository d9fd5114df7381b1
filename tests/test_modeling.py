"""ImgCapConfig and ImgCapForConditionalGeneration on tiny random configs, both decoders."""

import pytest
import torch
from transformers import AutoModel, ResNetConfig, ResNetForImageClassification, ResNetModel
from transformers.modeling_outputs import BaseModelOutput

from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration

VOCAB_SIZE = 40
DECODER_TYPES = ["attention", "pooled"]
TINY_RESNET = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32], "embedding_size": 8}


def tiny_config(decoder_type: str, **overrides) -> ImgCapConfig:
    settings = dict(
        vision_config=dict(TINY_RESNET),
        decoder_type=decoder_type,
        vocab_size=VOCAB_SIZE,
        embedding_size=16,
        hidden_size=32,
        attention_size=16,
        image_head_size=24,
        region_grid_size=2,
        use_region_positions=True,
        dropout=0.0,
    )
    settings.update(overrides)
    return ImgCapConfig(**settings)


def tiny_model(decoder_type: str, seed: int = 0, **overrides) -> ImgCapForConditionalGeneration:
    torch.manual_seed(seed)
    return ImgCapForConditionalGeneration(tiny_config(decoder_type, **overrides)).eval()


def random_images(batch_size: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_labels(batch_size: int = 3, length: int = 7, seed: int = 2) -> torch.Tensor:
    labels = torch.randint(4, VOCAB_SIZE, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    labels[:, -1] = 3  # <eos>
    return labels


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


def test_config_rejects_unknown_decoder_type_and_pooling():
    with pytest.raises(Exception, match="decoder_type must be one of"):
        ImgCapConfig(decoder_type="transformer")
    with pytest.raises(Exception, match="image_pooling must be one of"):
        ImgCapConfig(image_pooling="median")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dropout", 1.0, "dropout"),
        ("teacher_forcing_ratio", 1.5, "teacher_forcing_ratio"),
        ("hidden_size", 0, "hidden_size"),
    ],
)
def test_config_rejects_out_of_range_values(field, value, message):
    with pytest.raises(Exception, match=message):
        ImgCapConfig(**{field: value})


def test_default_config_is_the_published_resnet50_design():
    config = ImgCapConfig()
    assert isinstance(config.vision_config, ResNetConfig)
    assert list(config.vision_config.depths) == [3, 4, 6, 3]
    assert (config.vision_feature_size, config.num_regions) == (2048, 49)
    assert (config.hidden_size, config.embedding_size, config.num_hidden_layers) == (1024, 1024, 2)
    assert (config.dropout, config.vocab_size, config.freeze_encoder) == (0.5, 4096, True)


@pytest.mark.parametrize(
    "decoder_type, trainable, frozen",
    # The published figures: 29.38M trainable / 23.51M frozen (CNN + LSTM), 36.72M trainable (attention).
    [("pooled", 29_383_680, 23_508_032), ("attention", 36_722_689, 23_508_032)],
)
def test_default_parameter_counts_match_the_published_model(decoder_type, trainable, frozen):
    model = ImgCapForConditionalGeneration(ImgCapConfig(decoder_type=decoder_type))
    counted_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"{decoder_type}: trainable {counted_trainable:,}, frozen {counted_frozen:,}")
    assert (counted_trainable, counted_frozen) == (trainable, frozen)


# --------------------------------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_forward_shapes_and_attention_weights(decoder_type):
    model = tiny_model(decoder_type)
    output = model(pixel_values=random_images(), labels=random_labels(), output_attentions=True)
    assert output.logits.shape == (3, 7, VOCAB_SIZE)
    assert output.encoder_last_hidden_state.shape == (3, 4, 32)  # 2x2 grid of 32-channel regions
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    if decoder_type == "attention":
        (weights,) = output.cross_attentions
        assert weights.shape == (3, 1, 7, 4)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 1, 7))
    else:
        assert output.cross_attentions is None


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_loss_ignores_padding_positions(decoder_type):
    model = tiny_model(decoder_type)
    images, labels = random_images(), random_labels()
    padded = labels.clone()
    padded[:, 5:] = -100
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    logits = model(pixel_values=images, decoder_input_ids=decoder_input_ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, VOCAB_SIZE), labels[:, :5].reshape(-1))
    loss = model(pixel_values=images, decoder_input_ids=decoder_input_ids, labels=padded).loss
    torch.testing.assert_close(loss, expected)


def test_decoder_inputs_from_labels_shift_right_and_replace_ignored_positions():
    model = tiny_model("pooled")
    labels = torch.tensor([[10, 11, 3, -100], [12, 3, -100, -100]])
    expected = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 1]])
    assert torch.equal(model.prepare_decoder_input_ids_from_labels(labels), expected)


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_every_trainable_parameter_gets_a_gradient_and_the_frozen_encoder_none(decoder_type):
    model = tiny_model(decoder_type, dropout=0.1).train()
    model(pixel_values=random_images(), labels=random_labels()).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("encoder."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unfrozen_encoder_is_trained_and_frozen_batchnorm_stays_in_eval_mode():
    model = tiny_model("attention", freeze_encoder=False).train()
    assert model.encoder.backbone.training
    model(pixel_values=random_images(), labels=random_labels()).loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())

    frozen = tiny_model("attention").train()
    assert frozen.training and not frozen.encoder.backbone.training
    statistics = {k: v.clone() for k, v in frozen.encoder.state_dict().items() if "running" in k}
    frozen(pixel_values=random_images(), labels=random_labels())
    for key, value in frozen.encoder.state_dict().items():
        if "running" in key:
            assert torch.equal(value, statistics[key]), key


def _per_step_autograd_loss(model, images, labels):
    """The attention decoder's training loss built from plain per-step products (`step` without prepared weights),
    so autograd computes every weight's gradient at each step the usual way."""
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    state = model._initial_state(model.get_encoder()(images).last_hidden_state)
    step_logits = []
    for t in range(decoder_input_ids.shape[1]):
        logits, _, _, state = model.decoder.step(decoder_input_ids[:, t], state)
        step_logits.append(logits)
    logits = torch.stack(step_logits, dim=1)  # (batch, steps, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("autocast", [False, True])
def test_weight_gradients_gathered_once_per_pass_equal_per_step_autograd(autocast):
    """Training computes each decoder weight's gradient once for all steps (`_SharedStepWeight`): same gradients as
    autograd's per-step ones, also under bf16 autocast (where both round to bf16 products)."""
    model = tiny_model("attention").train()
    images, labels = random_images(), random_labels(length=9)
    labels[0, 5:] = -100  # padding positions contribute nothing in either

    def gradients_of(compute_loss) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = compute_loss()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    gathered = gradients_of(lambda: model(pixel_values=images, labels=labels).loss)
    per_step = gradients_of(lambda: _per_step_autograd_loss(model, images, labels))
    assert gathered.keys() == per_step.keys()
    # bf16 products sum in another order in the two: allow 3% of the gradient's largest entry (a step left out of the
    # sum changes the cell and output weights' gradients by 20-60%).
    tolerance = 3e-2 if autocast else 1e-5
    for name in gathered:
        largest = per_step[name].abs().max()
        assert (gathered[name] - per_step[name]).abs().max() <= tolerance * largest, name


def test_decoder_cells_compute_what_nn_lstmcell_computes():
    """The decoder's cell arithmetic reads `nn.LSTMCell` weights (saved checkpoints keep that layout)."""
    model = tiny_model("attention")
    cell = model.decoder.cells[0]
    inputs, hidden, cell_state = (torch.randn(4, size) for size in (cell.input_size, 32, 32))
    products = model.decoder.step_products(gather_gradients=False)  # `_lstm_cell` with plain weight products
    ours = products.cells[0](inputs, (hidden, cell_state))
    torch.testing.assert_close(ours, cell(inputs, (hidden, cell_state)))


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_step_by_step_decoding_equals_the_teacher_forced_forward(decoder_type):
    model = tiny_model(decoder_type)
    images, labels = random_images(), random_labels()
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    full = model(pixel_values=images, decoder_input_ids=decoder_input_ids, output_attentions=True)
    cache, step_logits = None, []
    encoder_outputs = model.get_encoder()(images)
    for t in range(decoder_input_ids.shape[1]):
        step = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids[:, t : t + 1], cache=cache)
        cache = step.cache
        step_logits.append(step.logits)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full.logits, atol=1e-5, rtol=1e-5)


def test_scheduled_sampling_feeds_back_the_models_own_predictions():
    """With teacher forcing 0 (and no dropout) training forward must reproduce free-running greedy decoding."""
    model = tiny_model("attention")
    images = random_images()
    greedy = model.generate(pixel_values=images, max_new_tokens=6, min_new_tokens=6, output_scores=True,
                            return_dict_in_generate=True)  # fmt: skip
    model.train()
    arbitrary_inputs = torch.full((3, 6), 5)
    arbitrary_inputs[:, 0] = 2
    free_running = model(pixel_values=images, decoder_input_ids=arbitrary_inputs, teacher_forcing_ratio=0.0)
    torch.testing.assert_close(free_running.logits.argmax(-1), greedy.sequences[:, 1:])
    teacher_forced = model(pixel_values=images, decoder_input_ids=arbitrary_inputs, teacher_forcing_ratio=1.0)
    assert not torch.equal(teacher_forced.logits, free_running.logits)


def test_scheduled_sampling_mixes_truth_and_predictions_for_the_pooled_decoder():
    model = tiny_model("pooled").train()
    images, labels = random_images(), random_labels(length=12)
    torch.manual_seed(0)
    mixed = model(pixel_values=images, labels=labels, teacher_forcing_ratio=0.5).logits
    forced = model(pixel_values=images, labels=labels, teacher_forcing_ratio=1.0).logits
    own = model(pixel_values=images, labels=labels, teacher_forcing_ratio=0.0).logits
    torch.testing.assert_close(mixed[:, 0], forced[:, 0])  # the first input is always <sos>
    assert not torch.allclose(mixed, forced) and not torch.allclose(mixed, own)


def test_normalized_image_input_stays_at_unit_scale_however_large_the_image_path_grows():
    """In training from a random encoder, the image input grew by orders of magnitude until the LSTM gates saturated
    and the image was ignored; with `normalize_image_input` the first-step input keeps unit scale per image."""
    model = tiny_model("pooled", normalize_image_input=True)
    recorded = []
    model.decoder.lstm.register_forward_pre_hook(lambda module, inputs: recorded.append(inputs[0]))
    with torch.no_grad():
        model.decoder.image_projection.weight.mul_(1e4)
        model._initial_state(model.encoder(random_images()).last_hidden_state)
    (image_input,) = recorded  # (batch, 1, embedding_size)
    torch.testing.assert_close(image_input.mean(-1), torch.zeros(3, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(image_input.std(-1, unbiased=False), torch.ones(3, 1), atol=1e-3, rtol=0)


def test_max_pooling_reads_the_strongest_value_of_each_channel():
    """Every region differs and values of both signs occur, so the max, the mean and the sum of the regions are three
    different vectors; the max model must start from exactly the state the mean model gets from the per-channel max
    (the mean of identical regions is that region)."""
    model = tiny_model("pooled", image_pooling="max")
    regions = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))  # (batch, regions, feature_size)
    channel_max = regions.amax(dim=1, keepdim=True).expand_as(regions)  # every region replaced by the maximum
    assert not torch.allclose(regions.amax(dim=1), regions.sum(dim=1))
    assert not torch.allclose(regions.amax(dim=1), regions.mean(dim=1))
    mean_model = tiny_model("pooled")
    mean_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        max_state = model._initial_state(regions)
        expected = mean_model._initial_state(channel_max)
        sum_state = mean_model._initial_state(regions * regions.shape[1])  # what a sum pooling would give
    torch.testing.assert_close(max_state.hidden, expected.hidden)
    torch.testing.assert_close(max_state.cell, expected.cell)
    assert not torch.allclose(max_state.hidden, sum_state.hidden, atol=1e-4)


@pytest.mark.parametrize("decoder_type", ["attention", "pooled"])
def test_one_encoder_pass_serves_several_captions_per_image(decoder_type):
    model = tiny_model(decoder_type)
    images, labels = random_images(batch_size=2), random_labels(batch_size=4)
    image_indices = torch.tensor([0, 0, 1, 1])
    shared = model(pixel_values=images, labels=labels, image_indices=image_indices)
    repeated = model(pixel_values=images[image_indices], labels=labels)
    torch.testing.assert_close(shared.logits, repeated.logits)
    torch.testing.assert_close(shared.loss, repeated.loss)


def test_pooled_image_head_dropout_draws_a_mask_per_caption_not_per_image():
    """Captions sharing an image still get their own dropout mask in the image head (the published regularisation;
    one mask per image cost test CIDEr on the shapes set)."""
    model = tiny_model("pooled", dropout=0.5).train()
    regions = model.encoder(random_images(batch_size=1)).last_hidden_state  # (1, regions, feature_size)
    state = model._initial_state(regions, image_indices=torch.zeros(4, dtype=torch.long))
    assert state.hidden.shape[1] == 4
    assert not torch.allclose(state.hidden[:, 0], state.hidden[:, 1])  # same image, different masks
    model.eval()
    state = model._initial_state(regions, image_indices=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(state.hidden[:, 0], state.hidden[:, 1])  # no dropout: identical rows


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


def test_beam_search_projects_each_image_for_attention_once_not_once_per_beam():
    """The image-only work of the first step (the regions' attention projection) runs on one row per image."""
    model = tiny_model("attention")
    projected_rows = []
    model.decoder.attention.region_projection.register_forward_hook(
        lambda module, inputs, output: projected_rows.append(inputs[0].shape[0])
    )
    sequences = model.generate(
        pixel_values=random_images(batch_size=2), num_beams=3, num_return_sequences=3, max_new_tokens=5
    )
    assert projected_rows == [2] and sequences.shape[0] == 6


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_image_at_a_time(decoder_type, num_beams):
    model = tiny_model(decoder_type)
    images = random_images(batch_size=4)
    batched = model.generate(pixel_values=images, num_beams=num_beams, max_new_tokens=8)
    for index in range(4):
        single = model.generate(pixel_values=images[index : index + 1], num_beams=num_beams, max_new_tokens=8)
        length = single.shape[1]
        assert torch.equal(batched[index, :length], single[0])
        assert (batched[index, length:] == model.config.pad_token_id).all()


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_one_beam_equals_greedy_and_greedy_follows_the_argmax(decoder_type):
    model = tiny_model(decoder_type)
    images = random_images()
    greedy = model.generate(pixel_values=images, max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    one_beam = model.generate(pixel_values=images, max_new_tokens=8, num_beams=1)
    assert torch.equal(greedy.sequences, one_beam)
    assert greedy.sequences[:, 0].eq(model.config.decoder_start_token_id).all()
    # Feeding the generated caption back teacher-forced gives the same argmax at every step.
    logits = model(pixel_values=images, decoder_input_ids=greedy.sequences[:, :-1]).logits
    steps = len(greedy.scores)
    assert torch.equal(logits[:, :steps].argmax(-1), greedy.sequences[:, 1 : steps + 1])


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_beam_search_options_and_sorted_scores(decoder_type):
    model = tiny_model(decoder_type)
    output = model.generate(
        pixel_values=random_images(),
        num_beams=4,
        num_return_sequences=3,
        length_penalty=0.7,
        no_repeat_ngram_size=2,
        max_new_tokens=10,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert output.sequences.shape[0] == 9
    scores = output.sequences_scores.view(3, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    for sequence in output.sequences.tolist():
        while sequence[-1] == model.config.pad_token_id:
            sequence.pop()
        bigrams = list(zip(sequence, sequence[1:]))
        assert len(bigrams) == len(set(bigrams)), sequence


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_beam_scores_are_the_models_log_likelihood_of_the_returned_captions(decoder_type):
    """Recompute every returned beam's score teacher-forced: this catches a wrongly reordered decoder state."""
    model = tiny_model(decoder_type)
    images = random_images()
    output = model.generate(
        pixel_values=images, num_beams=4, num_return_sequences=2, length_penalty=0.0, max_new_tokens=8,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    sequences = output.sequences
    logits = model(pixel_values=images.repeat_interleave(2, dim=0), decoder_input_ids=sequences[:, :-1]).logits
    token_logprobs = logits.log_softmax(-1).gather(2, sequences[:, 1:, None]).squeeze(2)  # (beams, steps)
    ended = (sequences[:, 1:] == model.config.eos_token_id).int()
    after_eos = (ended.cumsum(1) - ended) > 0  # positions after the first <eos> hold padding
    expected = token_logprobs.masked_fill(after_eos, 0.0).sum(1)
    torch.testing.assert_close(output.sequences_scores, expected, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_varied():
    model = tiny_model("attention")
    images = random_images()
    torch.manual_seed(3)
    first = model.generate(pixel_values=images, do_sample=True, temperature=2.0, max_new_tokens=8)
    torch.manual_seed(3)
    second = model.generate(pixel_values=images, do_sample=True, temperature=2.0, max_new_tokens=8)
    assert torch.equal(first, second)
    greedy = model.generate(pixel_values=images, max_new_tokens=8)
    assert not torch.equal(first, greedy)


def test_generate_returns_one_attention_map_per_generated_word():
    model = tiny_model("attention")
    output = model.generate(
        pixel_values=random_images(), max_new_tokens=5, min_new_tokens=5, output_attentions=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert len(output.cross_attentions) == output.sequences.shape[1] - 1
    for (step_weights,) in output.cross_attentions:
        assert step_weights.shape == (3, 1, 1, 4)
        torch.testing.assert_close(step_weights.sum(-1), torch.ones(3, 1, 1))


# --------------------------------------------------------------------------------------------------------------------
# Backbones and pretrained vision weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vision_config, regions, feature_size",
    [
        ({"model_type": "convnext", "depths": [1, 1], "hidden_sizes": [8, 16], "num_stages": 2}, 4, 16),
        (
            {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32},
            16,
            16,
        ),
    ],
    ids=["convnext", "vit"],
)  # fmt: skip
@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_pluggable_backbones(vision_config, regions, feature_size, decoder_type):
    model = tiny_model(decoder_type, vision_config=vision_config, freeze_encoder=False)
    assert model.config.num_regions == regions
    output = model(pixel_values=random_images(), labels=random_labels())
    assert output.encoder_last_hidden_state.shape == (3, regions, feature_size)
    output.loss.backward()
    # No ViT pooler that would never be trained. ConvNeXt's final LayerNorm only normalises its pooled vector, which
    # a region grid does not use; it stays in the backbone so that pretrained ConvNeXt checkpoints load unchanged.
    allowed_unused = {"encoder.backbone.layernorm.weight", "encoder.backbone.layernorm.bias"}
    unused = [n for n, p in model.named_parameters() if p.grad is None and n not in allowed_unused]
    assert not unused
    assert model.generate(pixel_values=random_images(), num_beams=2, max_new_tokens=4).shape[0] == 3


@pytest.mark.parametrize("checkpoint_kind", ["base model", "classification model (like microsoft/resnet-50)"])
def test_pretrained_backbone_weights_survive_initialisation_and_freezing_survives_reload(checkpoint_kind, tmp_path):
    torch.manual_seed(7)
    resnet_config = ResNetConfig(**{k: v for k, v in TINY_RESNET.items() if k != "model_type"}, num_labels=3)
    saved = (
        ResNetModel(resnet_config) if checkpoint_kind == "base model" else ResNetForImageClassification(resnet_config)
    )
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.add_(torch.randn_like(parameter))  # unmistakably not a fresh initialisation
    saved.save_pretrained(tmp_path / "backbone")

    model = ImgCapForConditionalGeneration.from_vision_pretrained(
        str(tmp_path / "backbone"), decoder_type="attention", vocab_size=VOCAB_SIZE, hidden_size=32,
        embedding_size=16, attention_size=16, region_grid_size=2,
    )  # fmt: skip
    reference = AutoModel.from_pretrained(tmp_path / "backbone").state_dict()
    for key, value in model.encoder.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert not any(p.requires_grad for p in model.encoder.parameters())

    model.save_pretrained(tmp_path / "captioner")
    reloaded = ImgCapForConditionalGeneration.from_pretrained(tmp_path / "captioner")
    assert not any(p.requires_grad for p in reloaded.encoder.parameters())
    assert all(p.requires_grad for p in reloaded.decoder.parameters())
    assert not reloaded.train().encoder.backbone.training
    for key, value in reloaded.encoder.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key


# --------------------------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_save_and_load_round_trip(decoder_type, tmp_path):
    model = tiny_model(decoder_type)
    images = random_images()
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_imgcap.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    reloaded = ImgCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    labels = random_labels()
    torch.testing.assert_close(
        reloaded(pixel_values=images, labels=labels).logits, model(pixel_values=images, labels=labels).logits,
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    for kwargs in ({}, {"num_beams": 3}):
        assert torch.equal(
            reloaded.generate(pixel_values=images, max_new_tokens=8, **kwargs),
            model.generate(pixel_values=images, max_new_tokens=8, **kwargs),
        )


# --------------------------------------------------------------------------------------------------------------------
# As transformers users use it: prompts, dtypes, a growing vocabulary, gradient checkpointing, bad calls
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_left_padded_prompts_continue_exactly_as_each_prompt_alone(decoder_type):
    """Prompts of different lengths in one batch: padding must leave the LSTM state unchanged."""
    from conftest import build_tiny_captioner

    model, processor = build_tiny_captioner(decoder_type, seed=4)
    images = random_images(batch_size=3)
    prefixes = ["a man rides", "", "a dog"]
    prompts = processor(prefix=prefixes, return_tensors="pt")
    assert prompts["decoder_attention_mask"].tolist()[1] == [0, 0, 0, 1]  # "" is <sos> alone, left-padded
    assert not (prompts["decoder_input_ids"] == processor.tokenizer.eos_token_id).any()
    settings = dict(max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    batched = model.generate(pixel_values=images, **prompts, **settings)
    for row, prefix in enumerate(prefixes):
        alone = model.generate(pixel_values=images[row : row + 1], **processor(prefix=prefix, return_tensors="pt"),
                               **settings)  # fmt: skip
        prompt_length = alone.sequences.shape[1] - 5
        assert processor.decode(alone.sequences[0, :prompt_length], skip_special_tokens=True) == prefix
        assert torch.equal(batched.sequences[row, -5:], alone.sequences[0, -5:])
        for batched_scores, alone_scores in zip(batched.scores, alone.scores):
            torch.testing.assert_close(batched_scores[row], alone_scores[0], atol=1e-5, rtol=1e-5)
    # Beam search spreads each prompt's mask over its beams.
    beams = dict(
        num_beams=3, num_return_sequences=2, max_new_tokens=4, output_scores=True, return_dict_in_generate=True
    )
    batched = model.generate(pixel_values=images, **prompts, **beams)
    for row, prefix in enumerate(prefixes):
        alone = model.generate(pixel_values=images[row : row + 1], **processor(prefix=prefix, return_tensors="pt"),
                               **beams)  # fmt: skip
        torch.testing.assert_close(batched.sequences_scores[2 * row : 2 * row + 2], alone.sequences_scores)


def test_a_prompt_holding_eos_is_refused_in_one_sentence():
    from conftest import build_tiny_captioner

    model, processor = build_tiny_captioner("attention")
    with_eos = processor.tokenizer(["a dog"], return_tensors="pt")["input_ids"]  # <sos> a dog <eos>
    with pytest.raises(ValueError, match=r"row 0 holds <eos> \(id 3\).*prefix="):
        model.generate(pixel_values=random_images(batch_size=1), decoder_input_ids=with_eos, max_new_tokens=3)


def test_generate_without_an_image_says_so():
    with pytest.raises(ValueError, match=r"^generate\(\) needs an image: pass `pixel_values`"):
        tiny_model("pooled").generate(max_new_tokens=3)
    with pytest.raises(ValueError, match=r"must be a \(batch, 3, height, width\) tensor, got shape \(3, 32, 32\)"):
        tiny_model("pooled").generate(pixel_values=random_images(batch_size=1)[0], max_new_tokens=3)


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_a_half_precision_model_reads_the_processors_float32_inputs(decoder_type, tmp_path):
    tiny_model(decoder_type).save_pretrained(tmp_path)
    model = ImgCapForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    images = random_images()  # float32, as the processor gives them
    output = model(pixel_values=images, labels=random_labels())
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.loss)
    float32_features = BaseModelOutput(last_hidden_state=model.get_encoder()(images).last_hidden_state.float())
    assert model.generate(encoder_outputs=float32_features, max_new_tokens=4).shape[0] == 3
    assert model.generate(pixel_values=images, num_beams=2, max_new_tokens=4).shape[0] == 3


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_resize_token_embeddings_grows_the_vocabulary_and_round_trips(decoder_type, tmp_path):
    from conftest import build_tiny_captioner

    model, processor = build_tiny_captioner(decoder_type)
    old_size = model.config.vocab_size
    assert model.get_input_embeddings() is model.decoder.embedding
    assert model.get_output_embeddings() is model.decoder.output
    images = random_images(batch_size=2)
    caption = processor(text=["a zebra runs ."] * 2, return_tensors="pt")["labels"]  # "zebra" spelled out
    with torch.no_grad():  # a graph kept alive across the resize would expect the old weight shape
        before = model(pixel_values=images, labels=caption).logits

    assert processor.tokenizer.add_tokens(["zebra"]) == 1
    model.resize_token_embeddings(len(processor.tokenizer))
    assert model.config.vocab_size == old_size + 1
    assert (
        model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == old_size + 1
    )
    # The known words' scores are unchanged; the new word's row is drawn around the old rows' mean, not left at 0.
    with torch.no_grad():
        after = model(pixel_values=images, labels=caption).logits  # the same ids: "zebra" is still spelled
    torch.testing.assert_close(after[..., :old_size], before)
    new_row = model.get_input_embeddings().weight[-1]
    old_rows = model.get_input_embeddings().weight[:-1]
    assert new_row.abs().sum() > 0 and new_row.norm() < 3 * old_rows.norm(dim=1).max()
    zebra = processor(text=["a zebra runs ."], return_tensors="pt")["labels"]
    assert zebra.max() == old_size  # now one token, the new id
    model(pixel_values=images[:1], labels=zebra).loss.backward()
    assert model.get_input_embeddings().weight.grad[old_size].abs().sum() > 0

    model.save_pretrained(tmp_path)
    reloaded = ImgCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == old_size + 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images, labels=caption).logits, after)


def _saved_activation_bytes(model, images, labels) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward."""
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(pixel_values=images, labels=labels).loss
    loss.backward()
    return sum(saved)


@pytest.mark.parametrize("how", ["gradient_checkpointing_enable", "Trainer argument"])
def test_gradient_checkpointing_recomputes_the_backbone_with_the_same_gradients(how, tmp_path):
    model = tiny_model("attention", freeze_encoder=False).train()
    images, labels = random_images(batch_size=4, size=64), random_labels(batch_size=4)
    statistics_before = {name: buffer.clone() for name, buffer in model.named_buffers()}  # BatchNorm's
    plain_bytes = _saved_activation_bytes(model, images, labels)
    plain_gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    plain_statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    if how == "gradient_checkpointing_enable":
        model.gradient_checkpointing_enable()
    else:  # the Trainer enables it when training starts; a learning rate of 0 leaves the weights as they are
        from transformers import Trainer, TrainingArguments

        arguments = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=1,
                                      learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
        Trainer(model=model, args=arguments, train_dataset=[{"pixel_values": images[0], "labels": labels[0]}]).train()
        model.zero_grad(set_to_none=True)
    assert model.is_activation_checkpointing and model.encoder.gradient_checkpointing
    for name, buffer in model.named_buffers():
        buffer.copy_(statistics_before[name])
    checkpointed_bytes = _saved_activation_bytes(model, images, labels)
    decoder_bytes = _saved_activation_bytes(tiny_model("attention").train(), images, labels)  # frozen backbone
    # The backbone keeps only its blocks' inputs (a quarter here); the decoder keeps what it kept.
    assert checkpointed_bytes - decoder_bytes < 0.4 * (plain_bytes - decoder_bytes), (checkpointed_bytes, plain_bytes)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, plain_gradients[name], atol=1e-6, rtol=1e-5, msg=name)
    # One update of BatchNorm's running statistics per step, as without checkpointing (the recomputation adds none).
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, plain_statistics[name], msg=name)


def test_gradient_checkpointing_refuses_a_backbone_it_cannot_checkpoint():
    convnext = {"model_type": "convnext", "depths": [1, 1], "hidden_sizes": [8, 16], "num_stages": 2}
    model = tiny_model("attention", vision_config=convnext, freeze_encoder=False)
    with pytest.raises(ValueError, match="ConvNextModel does not"):
        model.gradient_checkpointing_enable()
