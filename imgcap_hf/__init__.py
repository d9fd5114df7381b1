"""ImgCap-HF: CNN + LSTM image captioners (with and without soft attention) native to Hugging Face."""
