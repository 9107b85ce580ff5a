# mimzoo: `make demo` (install + a short MAE run on CIFAR-10 + linear probe), `make test`, `make test-fast`, `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
# The demo's linear probe: MAE's recipe (LARS, BN without affine) shortened to 2 x 60 batches; LARS
# moves weights by ~lr*1e-3*|w| per step, so a run this short needs blr 10 instead of MAE's 0.1.
DEMO_PROBE ?= data.batch_size=256 trainer.max_epochs=2 trainer.limit_train_batches=60 trainer.check_val_every_n_epoch=2 \
	protocol.warmup_epochs=0.5 protocol.blr=10

.PHONY: install demo lint test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# A short MAE pre-training on CIFAR-10 (downloaded to ./data unless MIMZOO_DATA points at a copy),
# then the MAE linear probe on its checkpoint.
demo: install
	rm -rf $(DEMO)
	$(BIN)/mimzoo-train experiment=demo data.download=true hydra.run.dir=$(DEMO)
	$(BIN)/mimzoo-eval protocol=linear ckpt=$(DEMO)/checkpoints/last.ckpt data.download=true \
		$(DEMO_PROBE) hydra.run.dir=$(DEMO)/linear_probe
	@echo "demo done: checkpoint $(DEMO)/checkpoints/last.ckpt, metrics $(DEMO)/metrics.csv,"
	@echo "           reconstructions $(DEMO)/reconstructions/, W&B offline run $(DEMO)/wandb/,"
	@echo "           linear probe $(DEMO)/linear_probe/results.json"

# ruff's lint and format check over the whole tree (rules in pyproject.toml); `ruff format .` fixes the layout.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two tiers: the fast in-process tests first, so their failures show early, then the slow ones (marked
# `slow`: end-to-end runs of the entry points in subprocesses, two-process DDP).
test: test-fast
	$(BIN)/python -m pytest -q -m slow -n 2

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# mimzoo against the official code, step for step (benchmarks/side_by_side.py; OFFICIAL="--official-mae PATH ..."
# times checkouts of the official repositories instead of the tests' re-statements), then the data loaders (PIL
# workers vs data.loader=device, benchmarks/data_throughput.py; needs CIFAR-10 under MIMZOO_DATA or ./data).
# benchmarks/mae_throughput.py (token dropping: the encoder on the visible 25% vs on all tokens) runs on its own.
bench: install
	$(BIN)/python benchmarks/side_by_side.py $(OFFICIAL) --json bench.json --markdown bench.md
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf runs multirun outputs bench.json bench.md
