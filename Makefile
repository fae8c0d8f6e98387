# The two front-door commands: `make demo` and `make test`.
# Everything they need is installed here, into a private virtualenv, at the exact
# versions in constraints.txt: the versions the whole suite last passed with.
# pyproject.toml keeps honest ranges for people who `pip install redpool` into their app.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := constraints.txt
# every extra the lock covers (what `make test`, `make demo` and `make bench` use)
EXTRAS := server,dev,test
# `make test-latest` and `make lock`: the newest releases pyproject.toml allows
LATEST := .venv-latest
# `make test-oldest`: the oldest ones it claims to accept (tools/floors.py)
OLDEST := .venv-oldest

.PHONY: demo test test-topology dev bench clean venv test-latest test-oldest lock polyglot

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "redpool needs Python 3.11 or newer (found %s)" % sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) pip setuptools wheel
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) --no-build-isolation -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/redpool demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The failover tests alone (Sentinel and Redis Cluster, replica in sync and lagging; part
# of `make test` too), printing what each failover cost: pushes confirmed, lost, run twice,
# promotion time, time until jobs are served again.
test-topology: $(STAMP)
	$(BIN)/python -m pytest tests/test_topology.py -s -rxX $(PYTEST_ARGS)

dev: $(STAMP)
	$(BIN)/redpool dev examples.tasks

# The Node.js, Ruby and Go toolchains (Debian packages, and `npm ci` of the pinned
# tests/polyglot/node) that tests/test_docs_polyglot.py needs to run the examples of
# docs/protocol.md.  Without them those tests skip; .ci/run installs them first and sets
# REDPOOL_REQUIRE_POLYGLOT=1, under which a missing toolchain fails instead.
polyglot:
	@tests/polyglot/install.sh

# Benchmarks (not part of `make test`): make bench BENCH_ARGS="--quick --reps 1"
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The whole suite against the newest release of every dependency, in a fresh virtualenv
# of its own (.venv-latest); constraints.txt is neither read nor changed.  Run it before
# a release, after changing a range in pyproject.toml, and now and then to hear early
# about a new release that breaks us.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST)/bin/python -m pip list --format freeze --exclude-editable
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# The whole suite against the lowest version of each dependency pyproject.toml accepts
# (its >= bounds, pinned by tools/floors.py), in .venv-oldest: run it after raising or
# lowering a bound, so that `pip install redpool` into an app never picks a release we
# have not seen pass.
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(OLDEST)/bin/python tools/floors.py > $(OLDEST)/floors.txt
	$(OLDEST)/bin/python -m pip install --quiet --constraint $(OLDEST)/floors.txt -e '.[$(EXTRAS)]'
	$(OLDEST)/bin/python -m pip list --format freeze --exclude-editable
	$(OLDEST)/bin/python -m pytest $(PYTEST_ARGS)

# Refresh constraints.txt: the newest releases, written down only if the suite passes
# with them (test-latest first).  Commit the new constraints.txt with what it needed.
lock: test-latest
	{ echo "# The exact versions 'make test', 'make demo' and 'make bench' install: the ones the"; \
	  echo "# whole suite last passed with.  Written by 'make lock' (after 'make test-latest');"; \
	  echo "# do not edit by hand.  pyproject.toml holds the ranges a user's install accepts."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v '^-e ' | LC_ALL=C sort -f; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "constraints.txt refreshed; 'make test' installs these versions next time."

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) build src/*.egg-info .pytest_cache
