"""ImgCap held to what transformers' own test mixins (`ModelTesterMixin`, `GenerationTesterMixin`) ask of every
model, on tiny configs of both decoders: save/load (sharded too), dtypes, tuple and dict outputs, hidden states and
attentions, every local `generate()` mode with its `return_dict_in_generate` output, and Trainer / Seq2SeqTrainer,
including gradient accumulation and label smoothing, checked against train.py's own training step."""

import types

import pytest
import torch
from conftest import TINY_RESNET, build_tiny_captioner
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, get_scheduler
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput

from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration

DECODER_TYPES = ["attention", "pooled"]
VOCAB_SIZE, HIDDEN_SIZE, REGIONS, BATCH, STEPS = 30, 24, 4, 3, 6


class ImgCapModelTester:
    """The tiny model and random inputs of these tests (the `XModelTester` of a transformers test file)."""

    def __init__(self, decoder_type: str):
        self.decoder_type = decoder_type

    def config(self, **overrides) -> ImgCapConfig:
        settings = dict(
            vision_config=dict(TINY_RESNET), decoder_type=self.decoder_type, vocab_size=VOCAB_SIZE, embedding_size=12,
            hidden_size=HIDDEN_SIZE, attention_size=12, image_head_size=16, region_grid_size=2, dropout=0.0,
        )  # fmt: skip
        return ImgCapConfig(**{**settings, **overrides})

    def model(self, seed: int = 0, **overrides) -> ImgCapForConditionalGeneration:
        torch.manual_seed(seed)
        return ImgCapForConditionalGeneration(self.config(**overrides)).eval()

    @staticmethod
    def inputs(batch_size: int = BATCH, seed: int = 1) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(4, VOCAB_SIZE, (batch_size, STEPS), generator=generator)
        labels[:, -1] = 3  # <eos>
        labels[0, 3:] = -100  # a shorter caption
        return {"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator), "labels": labels}


@pytest.fixture(params=DECODER_TYPES)
def tester(request) -> ImgCapModelTester:
    return ImgCapModelTester(request.param)


# --------------------------------------------------------------------------------------------------------------------
# ModelTesterMixin
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one file", "sharded"])
def test_save_load_gives_the_same_model(tester, max_shard_size, tmp_path):
    model, inputs = tester.model(), tester.inputs()
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size or "5GB")
    shards = sorted(path.name for path in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 if max_shard_size else shards == ["model.safetensors"]
    reloaded = ImgCapForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=5), model.generate(**inputs, max_new_tokens=5))


def test_dtype_round_trips(tester, tmp_path):
    model = tester.model()
    model.save_pretrained(tmp_path / "float32")
    half = ImgCapForConditionalGeneration.from_pretrained(tmp_path / "float32", dtype=torch.bfloat16)
    assert half.dtype == half.config.dtype == torch.bfloat16
    half.save_pretrained(tmp_path / "bfloat16")
    reloaded = ImgCapForConditionalGeneration.from_pretrained(tmp_path / "bfloat16")  # the saved dtype
    assert {parameter.dtype for parameter in reloaded.parameters()} == {torch.bfloat16}
    for name, parameter in reloaded.float().state_dict().items():
        expected = model.state_dict()[name]
        assert torch.equal(parameter, expected.to(torch.bfloat16).to(expected.dtype)), name
    with torch.no_grad():  # float32 images, as the processor gives them
        assert reloaded(**tester.inputs()).logits.dtype == torch.float32  # `.float()` made it float32 again
        assert half(**tester.inputs()).logits.dtype == torch.bfloat16


def test_tuple_and_dict_outputs_hold_the_same_tensors(tester):
    model, inputs = tester.model(), tester.inputs()
    with torch.no_grad():
        as_dict = model(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
        as_tuple = model(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False,
                         return_dict=False)  # fmt: skip
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for from_tuple, from_dict in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(from_dict, tuple):
            for a, b in zip(from_tuple, from_dict, strict=True):
                assert torch.equal(a, b)
        else:
            assert torch.equal(from_tuple, from_dict)


def test_hidden_states_and_attentions_have_the_documented_shapes(tester):
    model, inputs = tester.model(), tester.inputs()
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert output.logits.shape == (BATCH, STEPS, VOCAB_SIZE)
    assert output.encoder_last_hidden_state.shape == (BATCH, REGIONS, TINY_RESNET["hidden_sizes"][-1])
    (top_hidden,) = output.decoder_hidden_states
    assert top_hidden.shape == (BATCH, STEPS, HIDDEN_SIZE)
    assert output.decoder_attentions is None  # an LSTM has no self-attention
    if tester.decoder_type == "attention":
        (cross_attention,) = output.cross_attentions
        assert cross_attention.shape == (BATCH, 1, STEPS, REGIONS)
    else:
        assert output.cross_attentions is None  # Show-and-Tell sees the image once, pooled
    assert model(**inputs, output_hidden_states=False).decoder_hidden_states is None


# --------------------------------------------------------------------------------------------------------------------
# GenerationTesterMixin (group beam, constrained and contrastive search and DoLa live on the Hub in transformers 5)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, settings",
    [
        ("greedy", {}),
        ("sample", {"do_sample": True, "top_k": 5, "num_return_sequences": 2}),
        ("beam search", {"num_beams": 3, "num_return_sequences": 2}),
        ("beam sample", {"num_beams": 3, "do_sample": True, "num_return_sequences": 2}),
    ],
)
def test_every_generate_mode_returns_what_return_dict_in_generate_promises(tester, mode, settings):
    model, new_tokens = tester.model(), 4
    torch.manual_seed(0)
    output = model.generate(
        pixel_values=tester.inputs()["pixel_values"], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
        output_hidden_states=True, **settings,
    )  # fmt: skip
    returned = settings.get("num_return_sequences", 1)
    rows = BATCH * settings.get("num_beams", returned)  # decoder rows at each step
    beams = settings.get("num_beams", 1) > 1
    assert isinstance(output, GenerateBeamEncoderDecoderOutput if beams else GenerateEncoderDecoderOutput)
    assert output.sequences.shape == (BATCH * returned, 1 + new_tokens)
    assert output.sequences[:, 0].eq(model.config.decoder_start_token_id).all()
    for per_step in (output.scores, output.logits, output.decoder_hidden_states):
        assert len(per_step) == new_tokens
    for scores, logits, (hidden,) in zip(output.scores, output.logits, output.decoder_hidden_states):
        assert scores.shape == logits.shape == (rows, VOCAB_SIZE)
        assert hidden.shape == (rows, 1, HIDDEN_SIZE)
    if tester.decoder_type == "attention":
        assert [weights.shape for (weights,) in output.cross_attentions] == [(rows, 1, 1, REGIONS)] * new_tokens
    if beams:
        assert output.sequences_scores.shape == (BATCH * returned,)
        assert output.beam_indices.shape == (BATCH * returned, new_tokens)


# --------------------------------------------------------------------------------------------------------------------
# Trainer and Seq2SeqTrainer
# --------------------------------------------------------------------------------------------------------------------

CAPTIONS = [
    "A man rides a bike down a street .",
    "A dog runs .",
    "Two children play in the snow .",
    "A woman in a red dress sings .",
]


class CaptionedImages(torch.utils.data.Dataset):
    """Images with one caption each, as a user's dataset for Trainer would be."""

    def __init__(self, captions: list[str], seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.captions = captions
        self.images = [torch.rand(3, 40, 40, generator=generator) for _ in captions]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "caption": self.captions[index]}


def processor_collator(processor, **processor_kwargs):
    """The collator of the README's Trainer recipe: the processor turns a list of rows into one batch."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        images, captions = [row["image"] for row in rows], [row["caption"] for row in rows]
        return processor(images=images, text=captions, return_tensors="pt", **processor_kwargs)

    return collate


def trainer_arguments(tmp_path, **overrides) -> Seq2SeqTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), max_steps=2, logging_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False, train_sampling_strategy="sequential",
        seed=0,
    )  # fmt: skip
    return Seq2SeqTrainingArguments(**{**settings, **overrides})


def logged_training(trainer) -> list[tuple[float, float]]:
    trainer.train()
    return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]


def test_gradient_accumulation_trains_as_one_big_batch(tmp_path):
    """Two micro-batches of 2 accumulated equal one batch of 4 (captions of different lengths): the same logged loss
    and gradient norm, step after step, so clipping bites at the same point. (The loss code is the same for both
    decoders.)"""
    runs = {}
    for accumulation, batch_size in ((1, 4), (2, 2)):
        model, processor = build_tiny_captioner("attention")
        arguments = trainer_arguments(tmp_path, per_device_train_batch_size=batch_size,
                                      gradient_accumulation_steps=accumulation, max_grad_norm=0.5)  # fmt: skip
        trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=CaptionedImages(CAPTIONS * 2),
                                 data_collator=processor_collator(processor))  # fmt: skip
        runs[accumulation] = logged_training(trainer)
    assert len(runs[1]) == len(runs[2]) == 2
    for (loss_1, norm_1), (loss_2, norm_2) in zip(runs[1], runs[2]):
        assert loss_2 == pytest.approx(loss_1, rel=1e-5) and norm_2 == pytest.approx(norm_1, rel=1e-4)


def test_trainer_and_train_py_log_the_same_losses(tmp_path):
    """Same model, data, optimizer and schedule: Trainer's logged losses equal those train.py's training step gives
    (train.py logs the mean of an optimizer step's micro-batch losses), with gradient accumulation."""
    import datasets
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    import train
    from imgcap_hf.batching import ImageCaptionCollator, tokenize_captions
    from imgcap_hf.models.imgcap.image_processing_imgcap import ImgCapImageProcessor

    # Captions of one length (words of the tiny vocabulary, none spelled) and one per image: train.py's mean of
    # micro-batch means is then the token mean.
    captions = [["a man rides a bike ."], ["a dog runs on grass ."], ["two children play in snow ."]] * 2
    pixels = np.random.default_rng(0).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    split = datasets.Dataset.from_dict({"image": [Image.fromarray(image) for image in pixels], "captions": captions})
    model, processor = build_tiny_captioner("attention")
    image_processor = ImgCapImageProcessor(crop_size=32, crop_pct=1.0)
    caption_ids = tokenize_captions(processor.tokenizer, split, 40)
    assert len({len(ids) for image_captions in caption_ids for ids in image_captions}) == 1
    collator = ImageCaptionCollator(split, image_processor, caption_ids)
    initial_state = {name: value.clone() for name, value in model.state_dict().items()}

    def optimizer_and_schedule(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
        return optimizer, get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=3)

    # train.py's step, on batches from an accelerate-prepared loader as in train.py (first: Trainer's accelerator would
    # leave accelerate's shared gradient state at the end of its loader).
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer, scheduler = optimizer_and_schedule(model)
    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=1, collate_fn=collator)
    prepared_model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    run = types.SimpleNamespace(
        accelerator=accelerator, model=prepared_model, training_forward=prepared_model, optimizer=optimizer,
        scheduler=scheduler, progress=train.TrainingProgress(), args=types.SimpleNamespace(max_grad_norm=1.0),
        nonfinite_streak=0, objective=None,
    )  # fmt: skip
    prepared_model.train()
    micro_batch_losses = [train.train_on_batch(run, batch) for batch in loader]
    train_py_losses = [sum(micro_batch_losses[i : i + 2]) / 2 for i in range(0, 6, 2)]

    model.load_state_dict(initial_state)
    arguments = trainer_arguments(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=3)
    trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=list(range(6)), data_collator=collator,
                             optimizers=optimizer_and_schedule(model))  # fmt: skip
    trainer_losses = [loss for loss, _ in logged_training(trainer)]
    assert trainer_losses == pytest.approx(train_py_losses, rel=1e-5)


def test_label_smoothing_trains_with_the_smoothed_cross_entropy(tmp_path):
    """Trainer's `label_smoothing_factor` takes the labels away from the model's inputs: the processor's
    `return_decoder_input_ids=True` gives the model its inputs, and the first logged loss is the smoothed loss."""
    model, processor = build_tiny_captioner("attention")
    data = CaptionedImages(CAPTIONS)
    batch = processor_collator(processor)([data[index] for index in range(4)])
    with torch.no_grad():
        logits = model(**batch).logits
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, label_smoothing=0.1
    )
    arguments = trainer_arguments(tmp_path, per_device_train_batch_size=4, label_smoothing_factor=0.1, max_steps=1)
    trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=data,
                             data_collator=processor_collator(processor, return_decoder_input_ids=True))  # fmt: skip
    [(loss, _)] = logged_training(trainer)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_seq2seq_trainer_evaluates_with_generate_at_the_asked_length(tmp_path):
    """`predict_with_generate` with `generation_max_length`: the caller's length wins over a saved `max_new_tokens`."""
    model, processor = build_tiny_captioner("pooled")
    with torch.no_grad():  # captions that never end early and hold no <pad>: their lengths are visible
        model.decoder.output.bias[[model.config.eos_token_id, model.config.pad_token_id]] = -1e4
    model.generation_config.update(max_new_tokens=30, num_beams=2)
    model.save_pretrained(tmp_path / "saved")
    model = ImgCapForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert model.generate(**processor(images=CaptionedImages(CAPTIONS).images[:1], return_tensors="pt"),
                          max_length=5).shape == (1, 5)  # fmt: skip

    arguments = trainer_arguments(
        tmp_path, per_device_train_batch_size=2, per_device_eval_batch_size=4, predict_with_generate=True,
        generation_max_length=5, generation_num_beams=2,
    )  # fmt: skip
    trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=CaptionedImages(CAPTIONS),
                             data_collator=processor_collator(processor))  # fmt: skip
    assert len(logged_training(trainer)) == 2
    prediction = trainer.predict(CaptionedImages(CAPTIONS))
    assert prediction.predictions.shape[0] == 4 and "test_loss" in prediction.metrics
    generated = torch.as_tensor(prediction.predictions)
    assert (generated[:, 5:] == model.config.pad_token_id).all()  # padded by Seq2SeqTrainer beyond the 5 asked
    assert (generated[:, 1:5] != model.config.pad_token_id).all()
