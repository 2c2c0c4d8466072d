# The one task runner: CI calls `make test`. Everything installs what it needs first.
SHELL := /bin/bash
.DEFAULT_GOAL := build
PYTHON = $(shell scripts/ensure-python.sh)
CARGO_ENV = PYO3_PYTHON=$(PYTHON)
REBAR = rebar3

.PHONY: setup build rust erl test test-rust test-erl test-other-python soak proptest cpython-suite fuzz demo bench bench-cluster bench-pieces bench-memory bench-data bench-side-channel bench-compare bench-compare-erl lint clean

setup:
	@scripts/ensure-erlang.sh
	@scripts/ensure-python.sh >/dev/null

build: setup rust erl

# The same script is rebar3's compile hook (rebar.config), so pyport also builds itself
# as a dependency; here it is given the Python that `setup` found.
rust:
	PYPORT_PYTHON=$(PYTHON) scripts/build-port.sh

erl: export PYPORT_PYTHON = $(PYTHON)
erl:
	$(REBAR) compile
	$(REBAR) escriptize

test: build test-rust test-erl test-other-python

test-rust:
	$(CARGO_ENV) cargo test --release

test-erl: export PYPORT_PYTHON = $(PYTHON)
test-erl:
	$(REBAR) ct

# The Common Test suites once more on another installed CPython series (pyenv's 3.12
# when the default is 3.13), with a port program built for it apart; skipped, saying
# so, when the machine has no other series. The dependency, build-script, Elixir, CLI
# and soak suites build or time things and stay on the default.
OTHER_SUITES = $(subst $(eval) ,$(comma),$(addprefix test/pyport_,$(addsuffix _SUITE,\
	api types env ref callback async loop stream channel churn protocol reliability boundary pool \
	deadline contract lifecycle handles data)))
comma = ,
test-other-python: build
	@other=$$(scripts/other-python.sh $(PYTHON)); \
	if [ -z "$$other" ]; then echo "test-other-python: no other CPython >= 3.12 here; skipped"; exit 0; fi; \
	echo "test-other-python: the suites again on $$other"; \
	PYO3_PYTHON=$$other CARGO_TARGET_DIR=target/other-python cargo build --release --quiet && \
	PYPORT_PYTHON=$$other PYPORT_EXECUTABLE=$(CURDIR)/target/other-python/release/pyport \
	    $(REBAR) ct --suite $(OTHER_SUITES)

# The soak test at full size: 1,000 processes x 1,000 mixed requests, three crashes;
# then the churn benchmark: bytes per request of every kind (docs/reliability.md).
soak: build
	PYPORT_PYTHON=$(PYTHON) PYPORT_SOAK=full $(REBAR) ct --suite test/pyport_soak_SUITE
	PYPORT_PYTHON=$(PYTHON) escript benches/churn.escript

# The model of pyport (test/pyport_model*.erl, PropEr) at full size: at least 10,000
# sequential and 1,000 parallel commands from a fresh seed (logged; repeat a run with
# PYPORT_PROPTEST_SEED='{A,B,C}'). `make test' runs it from a fixed seed, a few hundred.
proptest: build
	PYPORT_PYTHON=$(PYTHON) PYPORT_PROPTEST=full $(REBAR) ct --suite test/pyport_model_SUITE --group model

# CPython's own tests of the modules users meet, in both context modes against a
# worker-thread control (docs/cpython-suite.md); `make test` runs a smoke subset. An
# hour or more; MODULES=test.test_os,test.test_socket runs those only.
cpython-suite: build
	PYPORT_PYTHON=$(PYTHON) PYPORT_CPYTHON_SUITE=$(or $(MODULES),full) \
	    nice $(REBAR) ct --suite test/pyport_cpython_SUITE

# The decoders and the frame reader against a million random and mutated inputs each.
fuzz: setup
	PROPTEST_CASES=1000000 $(CARGO_ENV) cargo test --release --test convert fuzz

demo: build
	escript scripts/demo.escript

# The C echo and stand-in of benches/stages.escript (the floors of a port round trip
# and of the Erlang side), built apart.
ECHO = _build/bench/echo
STANDIN = _build/bench/standin
_build/bench/%: benches/%.c benches/port_loop.h
	mkdir -p $(dir $@)
	cc -O2 -o $@ $<

bench: build $(ECHO) $(STANDIN)
	$(CARGO_ENV) cargo bench --bench session
	escript benches/stages.escript $(ECHO) $(STANDIN)
	escript benches/pyport_bench.escript
	escript benches/pool_bench.escript
	escript benches/cluster_bench.escript
	escript benches/memory.escript
	PYPORT_PYTHON=$(PYTHON) escript benches/data_bench.escript

bench-cluster: build
	escript benches/cluster_bench.escript

# The Erlang side's pieces under 50 callers, one at a time (docs/benchmarks.md).
bench-pieces: build $(ECHO) $(STANDIN)
	escript benches/pieces.escript $(STANDIN) 7 $(ECHO)

# The side-channel experiment: a 16 MiB reply through the pipe or a memfd (no pyport).
bench-side-channel: _build/bench/side_channel
	escript benches/side_channel.escript $< 9

_build/bench/side_channel: benches/side_channel.c
	mkdir -p $(dir $@)
	cc -O2 -Wall -o $@ $<

# Big numpy arrays in and out (arrays => binary, and as lists) against a 16 MiB binary
# echo in the same run (docs/benchmarks.md, "numpy arrays").
bench-data: build
	PYPORT_PYTHON=$(PYTHON) escript benches/data_bench.escript

# Resident memory of idle and of ended contexts (docs/architecture.md, "Memory"); on
# another Python: PYPORT_PYTHON=... PYPORT_EXECUTABLE=<a port program built for it>.
bench-memory: build
	escript benches/memory.escript

# Before/after in one run: `make bench-compare OLD=/path/to/an/older/pyport`.
bench-compare: build
	escript benches/compare.escript priv/pyport $(OLD)

# The Erlang side before/after over the C stand-in (no Python, no Rust):
# `make bench-compare-erl OLD_EBIN=/path/to/an/older/tree/_build/default/lib/pyport/ebin`.
bench-compare-erl: build $(STANDIN)
	escript benches/compare_ebin.escript _build/default/lib/pyport/ebin $(OLD_EBIN) $(STANDIN)

lint: setup
	$(CARGO_ENV) cargo fmt --check
	$(CARGO_ENV) cargo clippy --release --all-targets -- -D warnings
	$(REBAR) dialyzer

clean:
	cargo clean
	rm -rf _build priv/pyport
