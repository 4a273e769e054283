# npcforge: `make demo` runs the main job on the sample roster; `make test` runs the tests.
# Everything installs into .venv; torch 2.13.0 (CPU) goes in FIRST so nothing pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DIST   ?= dist
# The two NPCs the demo talks to; `make demo DEMO_ONLY=` builds the whole roster (~20 CPU-minutes each on 2 AVX2 cores).
DEMO_ONLY ?= --only magda --only rosie

.PHONY: install system-deps demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[build,test]'
	touch $@

install: $(STAMP)

# Debian packages the tests drive: headless Chromium (report rendering), Mono (Unity client), g++ (C++ client).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v mcs >/dev/null || missing="$$missing mono-mcs"; \
	command -v mono >/dev/null || missing="$$missing mono-runtime"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: install system-deps
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/npcforge model fetch
	$(BIN)/npcforge validate characters/
	@echo "== the dense base model, in character (a preview before pruning) =="
	$(BIN)/npcforge model ask --character characters/magda.yaml "What can you forge for me?"
	@echo "== building characters$(if $(DEMO_ONLY), ($(DEMO_ONLY))) with the fast preset (a character that fails the quality gate is rebuilt with a wider FFN; the summary says so) =="
	$(BIN)/npcforge build characters/ -o $(DIST) --preset fast --jobs 2 $(DEMO_ONLY); [ $$? -le 1 ]
	$(BIN)/npcforge inspect $(DIST)/magda
	BIN=$(BIN) scripts/demo_conversation.sh $(DIST) magda rosie
	@echo "== open $(DIST)/report.html in a browser for the build report =="

clean:
	rm -rf $(DIST) .pytest_cache
