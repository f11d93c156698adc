# Two commands do everything on a fresh machine:
#   make run    install, then run the main job (CPU debug recipe, 2 gloo ranks)
#   make test   install, then run the test suite
PYTHON ?= python3
RECIPE ?= recipes/debug_cpu.toml

.PHONY: install run test
install:
	# torch==2.14.1 first, pinned: an unpinned torch could pull a different multi-GB build.
	$(PYTHON) -m pip install -q torch==2.14.1
	$(PYTHON) -m pip install -q -e ".[titan,test]"

run: install
	$(PYTHON) -m dist_marsm.train --recipe $(RECIPE)
	$(PYTHON) -m dist_marsm.plot outputs/debug_cpu

test: install
	$(PYTHON) -m pytest -q -ra tests
