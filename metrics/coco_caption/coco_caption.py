"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) as an `evaluate` module.

Load it from its folder (works offline): ``evaluate.load("/path/to/metrics/coco_caption")``. It needs the
``imgcap_hf`` package, which computes the scores exactly as coco-caption (pycocoevalcap) does.
"""

import datasets
import evaluate

from imgcap_hf.scoring import compute_caption_metrics

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = """\
The captioning metrics of the coco-caption toolkit, with its numbers: captions are tokenized by its own Stanford PTB
tokenizer where `java` is on the PATH (otherwise by a Python tokenizer of the same conventions; the result's
`tokenizer` says which) and stripped of punctuation; BLEU uses the closest reference length and is computed over the
corpus; CIDEr-D takes its document frequencies from the references being scored, so add
the whole split before calling `compute` (one image alone always scores 0). METEOR is computed when `java` is on
the PATH.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per image (raw text; an empty string scores 0).
    references (`list` of `list` of `str`): the reference captions of each image (at least one each).
    include_meteor (`bool`, *optional*): compute METEOR; `None` (default) computes it when Java is available.
    tokenizer (`str`, *optional*): `"auto"` (default: Java's PTB tokenizer when available), `"ptb-java"`, `"python"`.
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, cider, rouge_l, meteor (when computed), num_images, and tokenizer (the caption
    tokenizer used: `"ptb-java"` or `"python"`).
Examples:
    >>> coco_caption = evaluate.load("metrics/coco_caption")
    >>> results = coco_caption.compute(
    ...     predictions=["a dog runs on the grass", "two men ride bikes"],
    ...     references=[["A dog is running on the grass .", "A brown dog runs ."], ["Two men riding bicycles ."]],
    ...     include_meteor=False,
    ... )
    >>> round(results["bleu_1"], 4), results["num_images"]
    (0.7239, 2)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    """coco-caption scores of generated captions against their references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap", "https://github.com/tylin/coco-caption"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(self, predictions, references, include_meteor=None, tokenizer="auto"):
        return compute_caption_metrics(predictions, references, include_meteor=include_meteor, tokenizer=tokenizer)
