# Two commands do all the set-up on a fresh machine:
#   make demo   installs what is needed and runs `python train.py` (the embedded default run)
#   make test   installs what is needed (with dev tools) and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lint bench-overhead clean help

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install lightmods with dev tools (CPU torch)

demo: $(STAMP)  ## fine-tune MiniLM with LoRA on the embedded demo task
	HF_HUB_OFFLINE=1 $(BIN)/python train.py

test: $(STAMP)  ## run the whole test suite
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q tests

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check lightmods tests train.py experiments

bench-overhead: $(STAMP)  ## lightmods vs a hand-written loop with HF PEFT
	HF_HUB_OFFLINE=1 $(BIN)/python experiments/bench/overhead.py --steps 80 --rounds 3

clean:  ## remove run outputs
	rm -rf logs outputs multirun
