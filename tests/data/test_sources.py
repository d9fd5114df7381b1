"""Tests of imgcap_hf.data.sources: `load_caption_dataset` passes its options on and refuses what is no dataset."""

import pytest

from imgcap_hf.data import load_caption_dataset


def test_load_caption_dataset_makes_shapes_with_the_given_arguments():
    dataset_dict, report = load_caption_dataset(
        "shapes", shapes_kwargs={"num_train": 4, "num_validation": 2, "num_test": 3}
    )
    assert report.images_per_split == {"train": 4, "validation": 2, "test": 3}
    assert report.captions_per_split == {"train": 20, "validation": 10, "test": 15}
    assert dataset_dict["test"].num_rows == 3


def test_unknown_folders_and_names_say_what_was_expected(tmp_path):
    (tmp_path / "captions.txt").write_text("1000.jpg A dog .\n")
    with pytest.raises(ValueError) as raised:
        load_caption_dataset(str(tmp_path))
    message = str(raised.value)
    assert str(tmp_path) in message and "captions.txt" in message
    assert "results.csv" in message and "train/metadata.jsonl" in message and "'shapes'" in message
    with pytest.raises(ValueError, match="'coco'.*does not exist"):
        load_caption_dataset("coco")
    with pytest.raises(ValueError, match="karpathy_json applies to the Kaggle"):
        load_caption_dataset("shapes", karpathy_json="dataset_flickr30k.json")
    with pytest.raises(ValueError, match="validation_fraction and test_fraction"):
        load_caption_dataset(str(tmp_path), validation_fraction=0.6, test_fraction=0.5)
