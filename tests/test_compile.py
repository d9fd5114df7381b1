"""`compile_steps` (train.py --torch_compile): one compiled decoder step and backbone compute what eager mode computes,
and the number of graphs depends on the modes, not on the captions' lengths or the batches' sizes."""

import json
import logging

import pytest
import torch
from conftest import tiny_args
from test_modeling import VOCAB_SIZE, random_images, tiny_model
from transformers.modeling_outputs import BaseModelOutput

import train
from imgcap_hf.compilation import CompileCounter

# (images, captions per image, caption length): lengths that differ from batch to batch, then a last partial batch.
EPOCH = [(4, 2, 5), (4, 2, 9), (4, 2, 3), (4, 2, 12), (3, 1, 7)]
NEXT_EPOCH = [(4, 2, 6), (4, 2, 11), (4, 2, 2), (2, 2, 8)]  # lengths and sizes not seen before


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test starts from empty compile caches: graphs that an earlier test left would be reused, not counted."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def caption_batch(images: int, captions_per_image: int, length: int, features: bool = False) -> dict:
    """A training batch as `ImageCaptionCollator` builds it: each image (or its cached features) with its captions,
    `image_indices` mapping caption rows to images (seeded by the batch's shape)."""
    generator = torch.Generator().manual_seed(images * 100 + captions_per_image * 10 + length)
    rows = images * captions_per_image
    labels = torch.randint(4, VOCAB_SIZE, (rows, length), generator=generator)
    labels[:, -1] = 3  # <eos>
    if features:  # the tiny ResNet's 2 x 2 grid of 32 channels
        image_inputs = {
            "encoder_outputs": BaseModelOutput(last_hidden_state=torch.randn(images, 4, 32, generator=generator))
        }
    else:
        image_inputs = {"pixel_values": random_images(images, seed=length)}
    return {
        **image_inputs,
        "labels": labels,
        "image_indices": torch.arange(images).repeat_interleave(captions_per_image),
    }


def train_steps(model, batches, seed: int = 0, features: bool = False) -> list[float]:
    """Forward, backward and an AdamW step per batch; the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(seed)  # the scheduled-sampling draws
    losses = []
    for shape in batches:
        loss = model(**caption_batch(*shape, features=features)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def captions(model, features: bool = False) -> list[torch.Tensor]:
    """Greedy and beam-3 captions of three images (or of features laid out as the encoder returns them: a transposed
    view)."""
    model.eval()
    if features:
        regions = torch.randn(3, 32, 4, generator=torch.Generator().manual_seed(9)).transpose(1, 2)  # (3, 4, 32)
        image_inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=regions)}
    else:
        image_inputs = {"pixel_values": random_images(3, seed=9)}
    return [model.generate(**image_inputs, max_new_tokens=8, num_beams=beams) for beams in (1, 3)]


# Graphs of one run, by decoder: the frozen backbone (no gradients), then the attention decoder's step for the first
# word (its zero state needs no gradient) and for the others, or the Show-and-Tell decoder's one step; generation adds
# the attention decoder's step in evaluation (the Show-and-Tell decoder generates through its fused nn.LSTM).
TRAINING_GRAPHS = {"attention": 3, "pooled": 2}
GENERATION_GRAPHS = {"attention": 1, "pooled": 0}


@pytest.mark.slow
@pytest.mark.parametrize("decoder_type", ["attention", "pooled"])
def test_the_graphs_do_not_grow_with_caption_lengths_or_batch_sizes(decoder_type):
    # Scheduled sampling (teacher forcing 0.7, as the Flickr30k recipes use 0.9) runs both decoders word by word.
    eager = tiny_model(decoder_type, teacher_forcing_ratio=0.7)
    compiled = tiny_model(decoder_type, teacher_forcing_ratio=0.7)
    compiled.compile_steps(backend="eager")  # dynamo decides the graphs; running them eagerly keeps the test fast
    counter = CompileCounter()

    assert train_steps(compiled, EPOCH) == pytest.approx(train_steps(eager, EPOCH), abs=1e-6)
    assert counter.graphs == TRAINING_GRAPHS[decoder_type]
    assert train_steps(compiled, NEXT_EPOCH, seed=1) == pytest.approx(train_steps(eager, NEXT_EPOCH, seed=1), abs=1e-6)
    assert counter.graphs == TRAINING_GRAPHS[decoder_type]

    for compiled_ids, eager_ids in zip(captions(compiled), captions(eager)):
        assert torch.equal(compiled_ids, eager_ids)
    assert counter.graphs == TRAINING_GRAPHS[decoder_type] + GENERATION_GRAPHS[decoder_type]


@pytest.mark.slow
def test_inductor_compiled_training_and_captions_equal_eager():
    """The real compiler (inductor, C++ on CPU) on the attention decoder, from cached features (the backbone's graphs
    would only add compile time): losses over steps of mixed lengths and a partial batch, then greedy and beam
    captions. Dropout is on, with inductor drawing from the same generator as eager mode."""
    eager = tiny_model("attention", teacher_forcing_ratio=0.7, dropout=0.3)
    compiled = tiny_model("attention", teacher_forcing_ratio=0.7, dropout=0.3)
    compiled.compile_steps()
    batches = EPOCH[:2] + EPOCH[-1:]
    with torch._inductor.config.patch(fallback_random=True):
        compiled_losses = train_steps(compiled, batches, features=True)
        compiled_captions = captions(compiled, features=True)
    assert compiled_losses == pytest.approx(train_steps(eager, batches, features=True), abs=1e-5)
    for compiled_ids, eager_ids in zip(compiled_captions, captions(eager, features=True)):
        assert torch.equal(compiled_ids, eager_ids)


@pytest.mark.slow
def test_train_py_logs_and_records_the_graphs_it_compiled(tmp_path, caplog):
    # 28 images in batches of 8: three full batches and a partial one; the shapes recipe trains its encoder.
    quick_run = ["--shapes_num_train", "28", "--max_eval_samples", "4", "--num_beams", "1",
                 "--caption_tokenizer", "python", "--num_train_epochs", "1"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="train"):
        results = train.main(
            tiny_args(tmp_path, "attention", *quick_run, "--torch_compile", "--torch_compile_backend", "eager")
        )
    # The backbone in training and in validation; the decoder step for the first word, for the others, and in
    # validation's generate.
    assert results["torch_compile"]["graphs"] == 5
    assert json.loads((tmp_path / "all_results.json").read_text())["torch_compile"] == results["torch_compile"]
    assert f"torch.compile: compiled 5 graphs in {results['torch_compile']['compile_seconds']:.1f} s" in caplog.text


def test_an_unknown_compile_backend_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(tiny_args(tmp_path, "attention", "--torch_compile", "--torch_compile_backend", "inductr"))
    assert stopped.value.code == 2
    assert "--torch_compile_backend 'inductr' is not a torch.compile backend" in capsys.readouterr().err
