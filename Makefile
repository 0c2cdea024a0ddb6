# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-quality bench-speed clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m benchmarks.demo --out out/demo

COMFY_TESTS := tests/test_comfy_backend.py tests/test_comfy_workflows.py tests/test_comfy_side_by_side.py

# The engine suite runs in .venv (CPU torch 2.13). The ComfyUI suite needs torchvision, so it runs
# in .venv-comfy against a ComfyUI checkout that tools/setup_comfy.sh prepares; without one it
# says so and the rest still counts.
test: setup
	$(PY) -m pytest -q tests
	@OUT=$$(tools/setup_comfy.sh); rc=$$?; COMFY=$$(echo "$$OUT" | tail -n 1); \
	if [ $$rc -eq 3 ]; then echo "ComfyUI tests not run: no ComfyUI checkout (set COMFYUI_PATH, or fetch Comfy-Org/ComfyUI)"; \
	elif [ $$rc -ne 0 ]; then echo "tools/setup_comfy.sh failed ($$rc)"; exit $$rc; \
	else COMFYUI_PATH=$$COMFY .venv-comfy/bin/python -m pytest -q $(COMFY_TESTS); fi
	@# The WebUI suites: each WebUI's own code in its own venv (.venv-a1111, .venv-forge: transformers 4.x
	@# and its gradio), against a checkout tools/setup_webui.sh extracts; without sources they say so.
	@for W in a1111 forge; do VAR=$$(echo $$W | tr a-z A-Z)_PATH; \
	OUT=$$(tools/setup_webui.sh $$W); rc=$$?; DIR=$$(echo "$$OUT" | tail -n 1); \
	if [ $$rc -eq 3 ]; then echo "$$W tests not run: no $$W checkout (set $$VAR, or fetch its sources)"; \
	elif [ $$rc -ne 0 ]; then echo "tools/setup_webui.sh $$W failed ($$rc)"; exit $$rc; \
	else env $$VAR=$$DIR .venv-$$W/bin/python -m pytest -q tests/webui/test_$$W.py || exit 1; fi; done

bench-quality: setup
	$(PY) -m benchmarks.quality --out out/quality

# The engine's numbers in .venv; then, where a ComfyUI can be had, the Unlearn node beside ComfyUI's
# TrainLoraNode in .venv-comfy, merged into the same speed.json.
bench-speed: setup
	$(PY) -m benchmarks.speed --out out/speed
	@OUT=$$(tools/setup_comfy.sh); rc=$$?; COMFY=$$(echo "$$OUT" | tail -n 1); \
	if [ $$rc -eq 3 ]; then echo "side-by-side with TrainLoraNode not run: no ComfyUI checkout"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; \
	else COMFYUI_PATH=$$COMFY .venv-comfy/bin/python -m benchmarks.speed --vs-trainlora --out out/speed; fi

clean:
	rm -rf out .pytest_cache
