# Everything runs inside .venv, created on first use. TORCH picks the PyTorch build: the default pin installs a
# CPU wheel where one is available locally and PyPI's default (CUDA) wheel on GPU machines.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test style quality clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,app,hub]"
	touch $@

# Train the attention captioner on the built-in shapes set (CPU, a few minutes; train.py also scores it on the test
# split), print those test metrics from all_results.json, then caption example images it never saw with the beam
# search those metrics were computed with (the saved defaults are greedy).
demo: install
	$(BIN)/python train.py --overwrite_output_dir
	@$(BIN)/python -c "import json; results = json.load(open('outputs/shapes-attention/all_results.json')); \
	print('Test split:', json.dumps({k[5:]: v for k, v in results.items() if k.startswith('test_')}))"
	$(BIN)/python -c "from imgcap_hf.data import write_shapes_examples; write_shapes_examples('outputs/examples')"
	$(BIN)/python -m imgcap_hf caption --model outputs/shapes-attention --num_beams 5 outputs/examples/*.png

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

style: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
