# Two commands: `make demo` (install, generate demo data, run 01 -> 07, print results) and `make test`
# (install with the test tools, run the suite). `make install` only installs (what demo and test install first).
PY      := .venv/bin/python
CONFIG  ?= configs/demo.yaml
TASKS   ?= pcam dlbcl mixed

.PHONY: install demo test lint bench clean-demo

.venv/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

.venv/.dev: .venv/.runtime requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# grad-cam and staintools (test/bench-only references) would pull the non-headless OpenCV; their
	# other deps are all present (staintools' SPAMS comes from spams-bin in requirements-dev.txt)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps grad-cam==1.5.7 ttach==0.0.3 staintools==2.1.2
	touch $@

# Install the pipeline and the test tools into .venv, run nothing.
install: .venv/.dev

demo: .venv/.runtime
	$(PY) -m common.demo --config $(CONFIG)
	$(PY) 01_filter_pcam.py --config $(CONFIG)
	$(PY) 02_tile_dlbcl.py --config $(CONFIG)
	$(PY) 03_normalize.py --config $(CONFIG)
	$(PY) 04_cluster.py --config $(CONFIG)
	for task in $(TASKS); do \
	  $(PY) 05_train.py --config $(CONFIG) --set train.task=$$task --set train.overwrite=true && \
	  $(PY) 06_evaluate.py --config $(CONFIG) --set train.task=$$task && \
	  $(PY) 07_gradcam.py --config $(CONFIG) --set train.task=$$task || exit 1; \
	done
	$(PY) -m common.report --config $(CONFIG)

test: .venv/.dev
	$(PY) -m pytest

lint: .venv/.dev
	.venv/bin/ruff check .

bench: .venv/.dev
	$(PY) bench/run.py

clean-demo:
	rm -rf data/demo runs/demo
