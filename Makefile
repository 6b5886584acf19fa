# Two commands: `make serve` starts the service on the embedded demo models, `make test` runs the tests.
# Both create .venv (Python 3.11), install the pinned dependencies (CPU torch) and generate the gRPC stubs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUBS := gen/steering/v1/steering_pb2_grpc.py

.PHONY: serve test venv stubs demo-models eval-demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-search.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-search.txt
	# Make the repo and the generated stubs importable from every process (Ray workers included).
	$(PY) -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/sae_steering.pth", "w").write("\n".join(sys.argv[1:]) + "\n")' "$(CURDIR)" "$(CURDIR)/gen"
	touch $@

stubs: $(STUBS)

$(STUBS): protos/steering/v1/*.proto $(STAMP)
	mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen protos/steering/v1/*.proto
	touch gen/steering/__init__.py gen/steering/v1/__init__.py

DEMO_LM := models/demo-lm/model/config.json
DEMO_SHAPES := models/demo-llava/model/config.json models/demo-sdxl-turbo/pipeline/model_index.json

serve: $(STAMP) $(STUBS) $(DEMO_LM) $(DEMO_SHAPES)
	$(PY) -m services.app

# The demo models are committed; this rebuilds them from the seed only when they are missing.
$(DEMO_LM):
	$(PY) -m sae_runtime.demo.build --out models

$(DEMO_SHAPES):
	$(PY) -m sae_runtime.demo.shapes_build --out models

test: $(STAMP) $(STUBS)
	RAY_AUTH_MODE=disabled $(PY) -m pytest

demo-models: $(STAMP)
	$(PY) -m sae_runtime.demo.build --out models
	$(PY) -m sae_runtime.demo.shapes_build --out models

eval-demo: $(STAMP)
	$(PY) -m sae_runtime.demo.eval --models models --out reports/demo_eval.json
	$(PY) -m sae_runtime.demo.shapes_eval --models models --out reports/demo_eval.json
	$(PY) -m sae_runtime.demo.shapes_mitigation --models models --out reports/demo_eval.json
	$(PY) -m sae_runtime.demo.shapes_ceiling --models models --out reports/shapes_ceiling.json

bench: $(STAMP) $(STUBS)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) gen .pytest_cache
