# quiesce: `make demo` shows a whole backup cycle on SQLite; `make test` runs the suite.
# Both create the virtual environment first. `make test` also installs, as root, the
# Debian packages whose servers the tests start (PostgreSQL, MariaDB, Redis, fs tools,
# node_exporter) and the tools that read our system files (logrotate, systemd-tmpfiles).

PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
DEBIAN_PACKAGES := python3-venv postgresql mariadb-server redis-server sqlite3 \
                   util-linux dash xfsprogs btrfs-progs psmisc qemu-guest-agent \
                   prometheus-node-exporter logrotate systemd
# A binary from each package, to skip apt-get when everything is already there.
NEEDED_BINARIES := /usr/lib/postgresql/15/bin/postgres /usr/sbin/mariadbd \
                   /usr/bin/redis-server /usr/bin/sqlite3 /usr/sbin/fsfreeze /usr/bin/dash \
                   /usr/sbin/mkfs.xfs /usr/sbin/mkfs.btrfs /usr/bin/fuser /usr/sbin/qemu-ga \
                   /usr/bin/prometheus-node-exporter /usr/sbin/logrotate /usr/bin/systemd-tmpfiles

.PHONY: test demo bench deps venv clean man

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

deps:
	@missing=""; for b in $(NEEDED_BINARIES); do test -x $$b || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "note: missing$$missing; tests that need them will be skipped" >&2; exit 0; fi; \
	echo "installing Debian packages for the test servers:$$missing"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_PACKAGES)

test: deps venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python demo/run.py

bench: deps venv
	$(BIN)/python benchmarks/run.py

# The man page, generated from the CLI's own help (a test fails when it is stale).
man: venv
	$(BIN)/python docs/manpage.py > docs/quiesce.1

clean:
	rm -rf $(VENV) build *.egg-info
