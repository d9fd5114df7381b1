"""Tests of imgcap_hf.data.hub_flickr30k: the Hub copy is re-split by its own column, other copies are refused."""

import datasets
import huggingface_hub
import pytest
from datasets import Dataset
from PIL import Image

from imgcap_hf.data import CAPTION_FEATURES, SPLITS, convert_hub_flickr30k, load_caption_dataset


def hub_like_flickr30k(splits: list[str]) -> Dataset:
    """A tiny stand-in with the columns and types of nlphuji/flickr30k (refs/convert/parquet)."""
    return Dataset.from_dict(
        {
            "image": [Image.new("RGB", (6, 4), (index * 40, 0, 0)) for index in range(len(splits))],
            "caption": [
                [f"caption {sentence} of image {index}" for sentence in range(5)] for index in range(len(splits))
            ],
            "sentids": [[str(index * 5 + sentence) for sentence in range(5)] for index in range(len(splits))],
            "split": splits,
            "img_id": [str(index) for index in range(len(splits))],
            "filename": [f"{1000 + index}.jpg" for index in range(len(splits))],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.List(datasets.Value("string")),
                "sentids": datasets.List(datasets.Value("string")),
                "split": datasets.Value("string"),
                "img_id": datasets.Value("string"),
                "filename": datasets.Value("string"),
            }
        ),
    )


def test_hub_flickr30k_is_resplit_by_its_split_column():
    dataset_dict = convert_hub_flickr30k(hub_like_flickr30k(["train", "val", "test", "train", "val"]))

    assert {split: dataset_dict[split]["image_id"][:] for split in SPLITS} == {
        "train": ["1000.jpg", "1003.jpg"],
        "validation": ["1001.jpg", "1004.jpg"],
        "test": ["1002.jpg"],
    }
    assert all(dataset_dict[split].features == CAPTION_FEATURES for split in SPLITS)
    third = dataset_dict["test"][0]
    assert third["captions"] == [f"caption {sentence} of image 2" for sentence in range(5)]
    assert third["image"].getpixel((0, 0)) == (80, 0, 0)


def test_hub_flickr30k_copies_with_other_columns_or_splits_are_refused():
    with pytest.raises(ValueError, match=r"lacks the columns \['caption'\]"):
        convert_hub_flickr30k(hub_like_flickr30k(["train"]).rename_column("caption", "alt_text"))
    with pytest.raises(ValueError, match="Row 1 .* 'dev'"):
        convert_hub_flickr30k(hub_like_flickr30k(["train", "dev"]))


@pytest.mark.skipif(not huggingface_hub.constants.HF_HUB_OFFLINE, reason="would download Flickr30k from the Hub")
def test_flickr30k_offline_names_the_local_alternatives(tmp_path):
    with pytest.raises(ConnectionError, match="Hub is unreachable") as raised:
        load_caption_dataset("flickr30k", cache_dir=str(tmp_path))
    assert "Kaggle" in str(raised.value) and "imagefolder" in str(raised.value)
