"""The ImgCap model as Hub users get it: these files are its remote code.

`save_pretrained` copies the six modules here (configuration, modeling, tokenization, image processing, processing,
pipelines) flat beside `config.json`, and `trust_remote_code=True` runs them where `imgcap_hf` is not installed. So
they import only each other and torch, transformers, numpy and PIL, never the library around them
(`tests/test_hub_ready.py` checks both). This `__init__.py` is not shipped and stays empty: `imgcap_hf/__init__.py`
exports the classes.
"""
