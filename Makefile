# maintd — every target installs what it needs itself (Debian 12, as root), so a fresh clone needs only `make`.
PYTHON    ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
DEB_TEST  := memcached rsync openssh-server openssh-client libsystemd-dev pkg-config gcc python3-dev python3-venv
PREFIX    ?= /usr/local
DESTDIR   ?=

.PHONY: test demo bench deps install clean

deps: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(DEB_TEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: deps
	$(BIN)/python -m pytest -q

demo: deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
