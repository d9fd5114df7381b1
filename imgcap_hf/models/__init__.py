"""Model code shipped to the Hub, one folder per model (as in transformers' `models/`)."""
