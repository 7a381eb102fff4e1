# maintd — every target installs what it needs itself (Debian 12, as root), so a fresh clone needs only `make`.
PYTHON    ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
DEB_TEST  := memcached rsync openssh-server openssh-client libsystemd-dev pkg-config gcc python3-dev python3-venv \
             systemd systemd-container e2fsprogs curl nginx-light puma ruby-rack apache2 libapache2-mod-passenger \
             nodejs git default-jre-headless capistrano
# Rails 6.1 for the Rails tests, without recommends: `rails`'s pull node-jest-worker, which fails to install where
# Node.js does not come from Debian; these three give the same Rails.
DEB_RAILS := ruby-rails ruby-sqlite3 ruby-dalli
# What `make install` needs, in Debian's names: a venv of Debian's python3, and what systemd-python (the journal and
# sd_notify) is built from (a C compiler, pkg-config, libsystemd's and Python's headers). `make` itself comes first,
# by hand: `apt-get install make`.
DEB_BUILD := python3 python3-venv pkg-config libsystemd-dev gcc python3-dev
# What a server needs for the README's uploads (rsync over ssh into <root>/releases/); not for a staged install
# (DESTDIR=...), which is for a package that declares its own dependencies.
DEB_SERVER := rsync openssh-server
PREFIX    ?= /usr/local
DESTDIR   ?=

.PHONY: test lint demo demo-cluster bench deps install clean

# etcd for the cluster tests, unpacked from Debian's own packages rather than installed: installing etcd-server
# starts a system etcd on port 2379 wherever systemd runs, and the tests start their own on free ports. (Defined
# before the rules that name it: make expands a rule's prerequisites as it reads the rule.)
ETCD := .deps/etcd/usr/bin/etcd
# Prometheus and promtool for the metrics tests, the same way and for the same reason: installing `prometheus`
# enables a system Prometheus on port 9090. The tests start their own on a free port.
PROMETHEUS := .deps/prometheus/usr/bin/prometheus

deps: $(STAMP)

# $(call apt_missing,PACKAGES,APT-OPTIONS): install those of PACKAGES that are not installed yet; where there is no
# apt (another system), name them and carry on: the commands that need them then fail with their own message.
define apt_missing
	@if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then \
		echo "not Debian: this needs what Debian calls $(strip $(1)); install their equivalents"; exit 0; fi; \
	missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing >/dev/null; \
	fi
endef

$(STAMP): pyproject.toml Makefile
	$(call apt_missing,$(DEB_TEST),)
	$(call apt_missing,$(DEB_RAILS),--no-install-recommends)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: deps lint $(ETCD) $(PROMETHEUS)
	$(BIN)/python -m pytest -q

$(ETCD):
	rm -rf .deps/download && mkdir -p .deps/download
	cd .deps/download && (apt-get download -q etcd-server etcd-client 2>/dev/null || \
		(apt-get update -qq && apt-get download -q etcd-server etcd-client 2>/dev/null))
	for deb in .deps/download/*.deb; do dpkg-deb -x $$deb .deps/etcd; done
	rm -rf .deps/download
	test -x $@

$(PROMETHEUS):
	rm -rf .deps/download-prometheus && mkdir -p .deps/download-prometheus
	cd .deps/download-prometheus && (apt-get download -q prometheus 2>/dev/null || \
		(apt-get update -qq && apt-get download -q prometheus 2>/dev/null))
	dpkg-deb -x .deps/download-prometheus/prometheus_*.deb .deps/prometheus
	rm -rf .deps/download-prometheus
	test -x $@

# ruff (style, bugs, imports) and mypy --strict over the package; configured in pyproject.toml.
lint: deps
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: deps
	$(BIN)/python scripts/demo.py

# Three app servers on this machine and a 3-member etcd: one upload to all three switches them together.
demo-cluster: deps $(ETCD)
	$(BIN)/python scripts/demo_cluster.py

clean:
	rm -rf $(VENV) .deps build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache

# A real install: a venv of its own under $(PREFIX)/lib/maintd, the commands linked into $(PREFIX)/bin, the units
# (pointing at $(PREFIX)/bin), the example config, the web snippets, the maintenance page, the Capistrano plugin and
# the Rails cache initializer, the Prometheus alert rules and the Grafana dashboard, the README (the units'
# Documentation=). With DESTDIR, the files are staged for a package: every path written into them (the scripts'
# shebangs, the venv's own files, the compiled modules' source names) is $(PREFIX)'s, never $(DESTDIR)'s, so the
# tree works once moved to $(PREFIX).
UNITDIR   ?= /etc/systemd/system
VENVDIR   := $(PREFIX)/lib/maintd
install:
	$(call apt_missing,$(DEB_BUILD),)
	$(if $(DESTDIR),,$(call apt_missing,$(DEB_SERVER),))
	$(PYTHON) -m venv $(DESTDIR)$(VENVDIR)
	$(DESTDIR)$(VENVDIR)/bin/pip install -q --no-compile .
	$(if $(DESTDIR),grep -rlI -F '$(DESTDIR)$(VENVDIR)' $(DESTDIR)$(VENVDIR) | \
		xargs -r sed -i 's#$(DESTDIR)$(VENVDIR)#$(VENVDIR)#g')
	$(DESTDIR)$(VENVDIR)/bin/python -m compileall -q $(if $(DESTDIR),-f -s $(DESTDIR) -p /) $(DESTDIR)$(VENVDIR)/lib
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)/etc/maintd $(DESTDIR)$(PREFIX)/share/maintd
	ln -sf ../lib/maintd/bin/maintd $(DESTDIR)$(PREFIX)/bin/maintd
	ln -sf ../lib/maintd/bin/maintctl $(DESTDIR)$(PREFIX)/bin/maintctl
	for unit in systemd/maintd@.service systemd/maintd@.socket; do \
		sed 's#/usr/local/#$(PREFIX)/#g' $$unit > $(DESTDIR)$(UNITDIR)/$$(basename $$unit); done
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/maintd/README.md
	install -m 0644 etc/maintd/example.toml $(DESTDIR)/etc/maintd/example.toml
	install -m 0644 maintd/maintenance.html $(DESTDIR)$(PREFIX)/share/maintd/maintenance.html
	for snippet in etc/nginx/*.conf etc/apache2/*.conf; do \
		install -D -m 0644 $$snippet $(DESTDIR)/etc/maintd/web/$${snippet#etc/}; done
	install -D -m 0644 etc/capistrano/maintd.rake $(DESTDIR)$(PREFIX)/share/maintd/capistrano/maintd.rake
	install -D -m 0644 etc/rails/maintd_cache.rb $(DESTDIR)$(PREFIX)/share/maintd/rails/maintd_cache.rb
	install -D -m 0644 etc/prometheus/maintd.rules.yml $(DESTDIR)$(PREFIX)/share/maintd/prometheus/maintd.rules.yml
	install -D -m 0644 etc/grafana/maintd.json $(DESTDIR)$(PREFIX)/share/maintd/grafana/maintd.json

# Timings, side by side with the plain alternative; not part of `make test`. Writes bench/results.json.
bench: deps
	$(BIN)/python bench/run.py
