# The two commands a newcomer needs; both create the git-ignored .venv when it is missing.
#   make demo   # build a tiny MiniCPM-V 2.6, fine-tune it with LoRA on 2 CPU processes, ask it questions
#   make test   # the whole test suite (no GPU needed)
#   make test-fast   # the tests that start no processes (pytest -m "not launch"), for a quick check while editing
#   make test-lowest  # loading and remote-code tests again, on the lowest transformers allowed
#   make test-avx2    # the numerically sensitive tests again, on AVX2 kernels and one thread
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines this project is developed on take torch from local files; elsewhere pip downloads it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-avx2 test-fast test-lowest venv
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	touch $@

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) demo.py

test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

# A second CPU capability: the tests that compare floats other kernels computed (pytest -m numerics,
# the demo among them) again with torch's, MKL's and oneDNN's AVX2 kernels and one thread, as on a
# machine without AVX-512. On an AVX2-only machine the thread count is what changes the figures.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1

test-avx2: venv
	$(AVX2_ENV) PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m numerics

test-fast: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not launch"

# A second venv with the lowest transformers requirements.txt allows (the rest as for .venv).
LOWEST_VENV ?= .venv-lowest
TRANSFORMERS_FLOOR := $(shell sed -n 's/^transformers>=\([^,]*\),.*/\1/p' requirements.txt)

$(LOWEST_VENV)/.installed: requirements.txt
	python3 -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	echo "transformers==$(TRANSFORMERS_FLOOR)" > $(LOWEST_VENV)/constraints.txt
	DS_BUILD_OPS=0 $(LOWEST_VENV)/bin/python -m pip install -q -r requirements.txt -c $(LOWEST_VENV)/constraints.txt
	touch $@

test-lowest: $(LOWEST_VENV)/.installed
	PATH="$(abspath $(LOWEST_VENV))/bin:$$PATH" $(LOWEST_VENV)/bin/python -m pytest -q tests/test_loading.py tests/test_removed_names.py
