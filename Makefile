# mimzoo: `make demo` (install + a short MAE run on CIFAR-10 + linear probe), `make test`, `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo

.PHONY: install demo test bench clean

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
	$(BIN)/mimzoo-eval protocol=linear ckpt=$(DEMO)/checkpoints/last.ckpt experiment=demo_linear \
		data.download=true hydra.run.dir=$(DEMO)/linear_probe
	@echo "demo done: checkpoint $(DEMO)/checkpoints/last.ckpt, metrics $(DEMO)/metrics.csv,"
	@echo "           reconstructions $(DEMO)/reconstructions/, W&B offline run $(DEMO)/wandb/,"
	@echo "           linear probe $(DEMO)/linear_probe/results.json"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/mae_throughput.py --json bench.json

clean:
	rm -rf runs multirun outputs bench.json
