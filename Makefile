# Two commands do everything on a fresh machine:
#   make run    install, then run the main job (CPU debug recipe, 2 gloo ranks)
#   make test   install, then run the test suite
# Also: make wheel (dist/*.whl, with the recipes and launchers inside), make other-torch (the torch 2.15.0 and
# 2.11.0 pass of CI, in venvs of their own).
PYTHON ?= python3
RECIPE ?= recipes/debug_cpu.toml

.PHONY: install run test wheel other-torch
install:
	# torch==2.14.1 first, pinned: an unpinned torch could pull a different multi-GB build.
	$(PYTHON) -m pip install -q torch==2.14.1
	$(PYTHON) -m pip install -q -e ".[titan,test]"

run: install
	$(PYTHON) -m dist_marsm.train --recipe $(RECIPE)
	$(PYTHON) -m dist_marsm.plot outputs/debug_cpu

test: install
	$(PYTHON) -m pytest -q -ra tests

wheel:
	$(PYTHON) -m pip wheel -q --no-deps -w dist .

other-torch:
	bash .ci/other_torch.sh
