# The README's two commands: `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test sim deps fmt lint bench-identify bench-store bench-events bench-divergence

deps:
	./scripts/ensure-deps

# The main job on the embedded defaults of config.toml: the built-in simulator (64 shards in 16
# buckets, 4000 guilds, Discord's 5 s window), the in-process coordinator, the in-memory store and
# sink. It prints the summary line once every shard is steady, then serves until Ctrl-C.
run: deps
	$(CARGO) run --release -- run

# The gateway simulator alone, on fixed loopback ports.
sim: deps
	$(CARGO) run --release -- sim --shards 64 --max-concurrency 16 --guilds 4000 \
		--listen 127.0.0.1:7878 --resume-listen 127.0.0.1:7879 --token local-simulator-token

test: deps
	$(CARGO) test --workspace --lib --bins --tests

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Benchmarks: each ends with `result <bench> <key>=<value> ...` lines; docs/BENCHMARKS.md keeps
# the results with the command, the machine and the date.
bench-identify: deps
	$(CARGO) bench --bench identify

bench-store: deps
	$(CARGO) bench --bench store

bench-events: deps
	$(CARGO) bench --bench events

bench-divergence: deps
	$(CARGO) bench --bench divergence
