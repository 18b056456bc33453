# The two set-up commands of the README:
#   make demo   install fimio and realise the example graph on the default store
#   make test   install fimio with its test tools and run the whole test suite
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test deps system-deps test-deps

demo: deps
	fimio realise examples/graph/report.toml
	cat result/greetings.txt

test: test-deps
	$(PYTHON) -m pytest -q

# bubblewrap is the build sandbox; gcc builds the C examples; Nix is the test oracle
# for NAR bytes and the benchmark peer; util-linux gives unshare and setpriv (isolation tests).
system-deps:
	@if command -v apt-get >/dev/null; then \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap gcc nix-bin util-linux >/dev/null; \
	else echo "install bubblewrap, gcc and nix with your package manager"; fi

# pip writes no bytecode for an editable install, and where PYTHONDONTWRITEBYTECODE is set
# (as in many containers) Python would then compile fimio's modules again on every command
# (about 25 ms each time): compile them once here.
deps: system-deps
	$(PYTHON) -m pip install -q -e .
	$(PYTHON) -m compileall -q store cli

test-deps: system-deps
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m compileall -q store cli
