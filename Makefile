# The two set-up commands of the README:
#   make demo   install fimio and realise the example graph on the default store
#   make test   install fimio with its test tools and run the whole test suite
# fimio is installed into a virtual environment of its own, .venv: Debian's python3 refuses
# pip installs into the system ("externally managed") and may come without pip. The venv
# sees the interpreter's own packages, so what is installed there already is not fetched again.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test deps system-deps test-deps venv

demo: deps
	$(VENV)/bin/fimio realise examples/graph/report.toml
	cat result/greetings.txt
	@echo "fimio is installed in $(VENV): '. $(VENV)/bin/activate' puts it on your PATH"

test: test-deps
	$(PY) -m pytest -q

# bubblewrap is the build sandbox; gcc builds the C examples; Nix is the test oracle
# for NAR bytes and the benchmark peer; util-linux gives unshare and setpriv (isolation
# tests); python3-venv lets Debian's python3 make the virtual environment.
system-deps:
	@if command -v apt-get >/dev/null; then \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap gcc nix-bin util-linux python3-venv >/dev/null; \
	else echo "install bubblewrap, gcc, nix and Python's venv module with your package manager"; fi

venv: system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV)

# pip writes no bytecode for an editable install, and where PYTHONDONTWRITEBYTECODE is set
# (as in many containers) Python would then compile fimio's modules again on every command
# (about 25 ms each time): compile them once here.
deps: venv
	$(PY) -m pip install -q -e .
	$(PY) -m compileall -q store cli

test-deps: venv
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m compileall -q store cli
