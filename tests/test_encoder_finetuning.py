"""Fine-tuning the last stages of the backbone (`trainable_encoder_stages`, `--encoder_learning_rate`) and label
smoothing (`--label_smoothing`), on tiny random models."""

import json
import logging

import pytest
import torch
from conftest import TINY_RESNET, tiny_args
from huggingface_hub.errors import StrictDataclassError

import train
from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration
from imgcap_hf.scoring import coco_metrics

VOCAB_SIZE = 40
NUM_STAGES = len(TINY_RESNET["depths"])


def tiny_model(seed: int = 0, **overrides) -> ImgCapForConditionalGeneration:
    settings = dict(vision_config=dict(TINY_RESNET), vocab_size=VOCAB_SIZE, embedding_size=16, hidden_size=32,
                    attention_size=16, region_grid_size=2, dropout=0.0)  # fmt: skip
    torch.manual_seed(seed)
    return ImgCapForConditionalGeneration(ImgCapConfig(**{**settings, **overrides}))


def images_and_labels(batch_size: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(4, VOCAB_SIZE, (batch_size, 6), generator=generator)
    labels[:, -1] = 3  # <eos>
    labels[0, -2:] = -100  # a shorter caption, padded
    return images, labels


def backbone_state(model) -> dict[str, torch.Tensor]:
    """Every backbone parameter and buffer (BatchNorm's running statistics and batch counts), copied."""
    return {name: tensor.detach().clone() for name, tensor in model.encoder.backbone.state_dict().items()}


def in_trained_stages(name: str, num_trained: int) -> bool:
    """Whether a backbone state_dict key lies in one of the last `num_trained` stages."""
    return any(name.startswith(f"encoder.stages.{stage}.") for stage in range(NUM_STAGES - num_trained, NUM_STAGES))


def is_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


@pytest.mark.parametrize("num_trained", [1, 2])
def test_partial_unfreezing_trains_exactly_the_last_stages_and_keeps_every_batchnorm_statistic(num_trained):
    model = tiny_model(trainable_encoder_stages=num_trained).train()
    images, labels = images_and_labels()
    before = backbone_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(pixel_values=images, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = backbone_state(model)
    for name, value in after.items():
        if in_trained_stages(name, num_trained) and not is_statistic(name):
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:  # the stem, the earlier stages, and the running statistics of all stages
            assert torch.equal(value, before[name]), f"{name} changed"
    trained = {name for name, p in model.encoder.backbone.named_parameters() if p.requires_grad}
    assert trained == {name for name in before if in_trained_stages(name, num_trained) and not is_statistic(name)}


def test_fixed_stages_keep_no_activations_for_the_backward_pass():
    """Only the trained stages' outputs belong to the autograd graph: the stem and earlier stages record nothing (as
    under no_grad), so the training forward keeps fewer activations than with the whole backbone trained."""
    model = tiny_model(trainable_encoder_stages=1).train()
    in_graph = {}
    backbone = model.encoder.backbone
    for name, module in [
        ("stem", backbone.embedder),
        *((f"stage {i}", s) for i, s in enumerate(backbone.encoder.stages)),
    ]:
        module.register_forward_hook(lambda module, inputs, output, name=name: in_graph.update({name: output.grad_fn}))
    images, labels = images_and_labels()
    model(pixel_values=images, labels=labels).loss.backward()
    assert [name for name, grad_fn in in_graph.items() if grad_fn is not None] == [f"stage {NUM_STAGES - 1}"]


def test_gradient_checkpointing_with_partial_unfreezing_gives_the_same_gradients():
    model = tiny_model(trainable_encoder_stages=2).train()
    images, labels = images_and_labels()
    model(pixel_values=images, labels=labels).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    model(pixel_values=images, labels=labels).loss.backward()
    checkpointed = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert checkpointed.keys() == plain.keys()
    assert any(in_trained_stages(name.removeprefix("encoder.backbone."), 2) for name in plain)
    for name, gradient in checkpointed.items():
        torch.testing.assert_close(gradient, plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_partial_unfreezing_survives_save_and_load(tmp_path):
    model = tiny_model(trainable_encoder_stages=1)
    model.save_pretrained(tmp_path)
    reloaded = ImgCapForConditionalGeneration.from_pretrained(tmp_path).train()
    assert (reloaded.config.freeze_encoder, reloaded.config.trainable_encoder_stages) == (True, 1)
    trained = {name for name, p in reloaded.encoder.backbone.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(f"encoder.stages.{NUM_STAGES - 1}.") for name in trained)
    last_stage = reloaded.encoder.backbone.encoder.stages[-1]
    batchnorms = [m for m in reloaded.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert last_stage.training and batchnorms and not any(m.training for m in batchnorms)

    reloaded.freeze_encoder()  # back to a fully frozen backbone, recorded in the config
    assert reloaded.config.trainable_encoder_stages == 0
    assert not any(p.requires_grad for p in reloaded.encoder.parameters())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"trainable_encoder_stages": 1, "freeze_encoder": False}, "needs freeze_encoder=True"),
        ({"trainable_encoder_stages": NUM_STAGES + 1}, f"at most {NUM_STAGES}, the number of stages"),
        ({"trainable_encoder_stages": -1}, "must be an integer >= 0"),
        ({"trainable_encoder_stages": 1, "vision_config": {"model_type": "vit"}}, "vit has none"),
    ],
)
def test_contradictory_freezing_settings_are_refused(settings, message):
    with pytest.raises(StrictDataclassError, match=message):
        ImgCapConfig(**{"vision_config": dict(TINY_RESNET), **settings})
    model = tiny_model()
    with pytest.raises(ValueError, match="needs freeze_encoder=True"):
        model.freeze_encoder(False, trainable_stages=1)
    assert model.config.freeze_encoder and not any(p.requires_grad for p in model.encoder.parameters())


def test_label_smoothing_is_the_smoothed_cross_entropy_and_zero_is_the_plain_loss():
    model = tiny_model().eval()
    images, labels = images_and_labels()
    with torch.no_grad():
        plain = model(pixel_values=images, labels=labels)
        unsmoothed = model(pixel_values=images, labels=labels, label_smoothing=0.0).loss
        smoothed = model(pixel_values=images, labels=labels, label_smoothing=0.2).loss
        summed = model(pixel_values=images, labels=labels, label_smoothing=0.2, num_items_in_batch=40).loss
    assert torch.equal(unsmoothed, plain.loss)
    # By hand: (1 - e) * the label's cross-entropy + e * the mean cross-entropy over the vocabulary, at real labels.
    log_probs = plain.logits.log_softmax(dim=-1)  # (batch, steps, vocab)
    real = labels != -100  # (batch, steps)
    label_term = -log_probs[real].gather(1, labels[real].unsqueeze(1)).squeeze(1)  # (real labels,)
    uniform_term = -log_probs[real].mean(dim=-1)  # (real labels,)
    per_label = 0.8 * label_term + 0.2 * uniform_term
    torch.testing.assert_close(smoothed, per_label.mean())
    torch.testing.assert_close(summed, per_label.sum() / 40)
    assert not torch.isclose(smoothed, plain.loss)


# --------------------------------------------------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------------------------------------------------


def test_the_encoder_gets_its_own_learning_rate_under_the_schedule_and_no_feature_cache(tmp_path, monkeypatch, caplog):
    """A short run with the last stage trained: the encoder's parameter group has --encoder_learning_rate, the
    schedule scales both groups alike, both rates are logged, the images are encoded at every step (no cache), and
    the loss the model computes is smoothed by --label_smoothing."""
    caplog.set_level(logging.INFO, logger="train")
    built, smoothing = [], []
    build_optimizer = train.build_optimizer

    def recording_build_optimizer(args, model):
        built.append(build_optimizer(args, model))
        return built[-1]

    monkeypatch.setattr(train, "build_optimizer", recording_build_optimizer)

    def no_cache(*args, **kwargs):
        raise AssertionError("the feature cache was built for a training encoder")

    monkeypatch.setattr(train, "load_features", no_cache)
    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)  # no METEOR: its Java start dominates the run
    forward = ImgCapForConditionalGeneration.forward

    def recording_forward(self, *args, **kwargs):
        if self.training:
            smoothing.append(kwargs.get("label_smoothing"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ImgCapForConditionalGeneration, "forward", recording_forward)
    quick = ["--shapes_num_train", "16", "--max_eval_samples", "2", "--num_beams", "1", "--max_train_steps", "2",
             "--caption_tokenizer", "python", "--checkpointing_steps", "no",
             "--lr_scheduler_type", "linear", "--logging_steps", "1"]  # fmt: skip
    fine_tuning = ["--freeze_encoder", "--trainable_encoder_stages", "1", "--label_smoothing", "0.1"]
    train.main(tiny_args(tmp_path, "attention", *fine_tuning, *quick))

    [optimizer] = built
    decoder_group, encoder_group = optimizer.param_groups
    assert (decoder_group["initial_lr"], encoder_group["initial_lr"]) == (1e-2, 1e-3)  # a tenth by default
    assert decoder_group["lr"] / 1e-2 == pytest.approx(encoder_group["lr"] / 1e-3) and decoder_group["lr"] < 1e-2
    # After step 1 of 2 the linear schedule stands halfway: each group's rate, in the loss log and the log lines.
    first_step = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    assert (first_step["lr"], first_step["encoder_lr"]) == pytest.approx((5e-3, 5e-4))
    assert "step 1/2: loss" in caplog.text and "learning rate 0.005, encoder learning rate 0.0005" in caplog.text
    saved = ImgCapForConditionalGeneration.from_pretrained(tmp_path)
    encoder_parameters = {id(p) for p in encoder_group["params"]}
    assert len(encoder_parameters) == sum(1 for _ in saved.encoder.backbone.encoder.stages[-1].parameters())
    assert saved.config.trainable_encoder_stages == 1
    assert smoothing and set(smoothing) == {0.1}


def test_equal_learning_rates_keep_one_parameter_group(tmp_path):
    """A whole encoder trained with --no-freeze_encoder defaults to --learning_rate: one group, as before the flag."""
    args = train.parse_args(tiny_args(tmp_path, "attention", "--no-freeze_encoder"))
    assert args.encoder_learning_rate == args.learning_rate
    [group] = train.build_optimizer(args, train.build_model(args, vocab_size=VOCAB_SIZE)).param_groups
    assert group["lr"] == args.learning_rate
    args = train.parse_args(tiny_args(tmp_path, "attention", "--no-freeze_encoder", "--encoder_learning_rate", "1e-4"))
    model = train.build_model(args, vocab_size=VOCAB_SIZE)
    decoder_group, encoder_group = train.build_optimizer(args, model).param_groups
    assert encoder_group["lr"] == 1e-4 and len(encoder_group["params"]) == len(list(model.encoder.parameters()))


def test_the_feature_cache_is_off_when_any_encoder_part_trains(tmp_path):
    fixed, fine_tuned = ["--freeze_encoder"], ["--freeze_encoder", "--trainable_encoder_stages", "1"]
    for flags, cached in (fixed, True), (fine_tuned, False), (["--no-freeze_encoder"], False):
        assert train.use_feature_cache(train.parse_args(tiny_args(tmp_path, "attention", *flags))) is cached, flags


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--label_smoothing", "1"], "--label_smoothing must be a number >= 0 and < 1, got 1.0"),
        (["--label_smoothing", "-0.1"], "--label_smoothing must be a number >= 0 and < 1, got -0.1"),
        (["--label_smoothing", "nan"], "--label_smoothing must be a number >= 0 and < 1, got nan"),
        (["--encoder_learning_rate", "0"], "--encoder_learning_rate must be a finite number > 0, got 0.0"),
        (["--encoder_learning_rate", "inf"], "--encoder_learning_rate must be a finite number > 0, got inf"),
        (["--trainable_encoder_stages", "-1"], "--trainable_encoder_stages must be an integer >= 0, got -1"),
        (["--trainable_encoder_stages", "4"], "trainable_encoder_stages must be at most 3, the number of stages"),
        (["--trainable_encoder_stages", "1", "--no-freeze_encoder"], "trainable_encoder_stages=1 needs freeze_enc"),
        (
            ["--trainable_encoder_stages", "1", "--feature_cache", "on"],
            "--feature_cache on needs --freeze_encoder and",
        ),
    ],
)
def test_bad_fine_tuning_flags_stop_with_one_line(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(tiny_args(tmp_path, "attention", "--freeze_encoder", *bad))
    usage, error = capsys.readouterr().err.strip().splitlines()  # argparse's usage line, then the error
    assert exit_info.value.code == 2 and usage.startswith("usage: ")
    assert ": error: " in error and message in error, error
