# The README's two commands: `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test sim deps fmt lint

deps:
	./scripts/ensure-deps

# Until the service's run command exists, `make run` starts the gateway simulator on fixed
# loopback ports, with 64 shards in 16 buckets and Discord's real times.
run: deps
	$(CARGO) run --release -- sim --shards 64 --max-concurrency 16 --guilds 4000 \
		--listen 127.0.0.1:7878 --resume-listen 127.0.0.1:7879 --token local-simulator-token

sim: run

test: deps
	$(CARGO) test --workspace --all-targets

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
