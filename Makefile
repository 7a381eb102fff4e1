# maintd — every target installs what it needs itself (Debian 12, as root), so a fresh clone needs only `make`.
PYTHON    ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# What `make install` needs, in Debian's names: a venv of Debian's python3, and what systemd-python (the journal and
# sd_notify) is built from (a C compiler, pkg-config, libsystemd's and Python's headers). `make` itself comes first,
# by hand: `apt-get install make`.
DEB_BUILD := python3 python3-venv pkg-config libsystemd-dev gcc python3-dev
# What `make test` needs besides: the services the tests start, the tools they drive, systemd-nspawn and debootstrap.
DEB_TEST  := $(DEB_BUILD) memcached rsync openssh-server openssh-client systemd systemd-container e2fsprogs curl \
             nginx-light puma ruby-rack apache2 libapache2-mod-passenger nodejs git default-jre-headless capistrano \
             debootstrap man-db bash-completion
# Rails 6.1 for the Rails tests, without recommends: `rails`'s pull node-jest-worker, which fails to install where
# Node.js does not come from Debian; these three give the same Rails.
DEB_RAILS := ruby-rails ruby-sqlite3 ruby-dalli
# What a server needs for the README's uploads (rsync over ssh into <root>/releases/); not for a staged install
# (DESTDIR=...), which is for a package that declares its own dependencies.
DEB_SERVER := rsync openssh-server
# What `make deb` needs besides DEB_BUILD (installed without recommends); `make test` installs them too, since
# tests/test_package.py builds the package.
DEB_PACKAGING := debhelper lintian dpkg-dev git
PREFIX    ?= /usr/local
DESTDIR   ?=

.PHONY: test lint demo demo-cluster bench deps install clean files docs deb wheels stage

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

$(STAMP): pyproject.toml constraints.txt Makefile
	$(call apt_missing,$(DEB_TEST),)
	$(call apt_missing,$(DEB_RAILS) $(DEB_PACKAGING),--no-install-recommends)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The package test (two package builds, one boot of a Debian root, and the first time a debootstrap of it) waits
# mostly on dpkg, the network and a container, not on the suite: it runs beside the rest of the suite, which keeps
# `make test` under 20 minutes on 2 cores; its report follows the suite's. Either failing fails the target. It runs in
# a process group of its own (setsid), which an interrupted `make test` ends whole: builds, debootstrap, container;
# and at a lower priority (nice): its compilers and dpkg take the CPU the suite leaves, never a suite test's turn.
PACKAGE_TEST := tests/test_package.py
test: deps lint $(ETCD) $(PROMETHEUS)
	@mkdir -p build
	@setsid nice -n 10 $(BIN)/python -m pytest -q $(PACKAGE_TEST) > build/test-package.log 2>&1 & package=$$!; \
	trap 'kill -TERM -- -$$package 2>/dev/null; exit 130' INT; \
	trap 'kill -TERM -- -$$package 2>/dev/null; exit 143' TERM; \
	$(BIN)/python -m pytest -q --durations=20 --ignore=$(PACKAGE_TEST); suite=$$?; \
	wait $$package; packaged=$$?; \
	echo "--- $(PACKAGE_TEST), run beside the rest (build/test-package.log):"; cat build/test-package.log; \
	[ $$suite -eq 0 ] && [ $$packaged -eq 0 ]

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
	rm -rf $(VENV) .deps build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache

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
	$(DESTDIR)$(VENVDIR)/bin/pip install -q -c constraints.txt --no-compile .
	rm -rf build/lib build/bdist.* maintd.egg-info  # what pip's build of . leaves in this tree
	$(if $(DESTDIR),grep -rlI -F '$(DESTDIR)$(VENVDIR)' $(DESTDIR)$(VENVDIR) | \
		xargs -r sed -i 's#$(DESTDIR)$(VENVDIR)#$(VENVDIR)#g')
	$(DESTDIR)$(VENVDIR)/bin/python -m compileall -q $(if $(DESTDIR),-f -s $(DESTDIR) -p /) $(DESTDIR)$(VENVDIR)/lib
	$(MAKE) --no-print-directory docs DOCS_PYTHON=$(DESTDIR)$(VENVDIR)/bin/python
	$(MAKE) --no-print-directory files
	rm -rf build/docs

# Timings, side by side with the plain alternative; not part of `make test`. Writes bench/results.json.
bench: deps
	$(BIN)/python bench/run.py

# Everything beside the venv, for `install` and the package alike: the commands linked into $(PREFIX)/bin, the units
# pointing at them, the example config, the web snippets, the maintenance page, the Capistrano plugin, the Rails
# cache initializer, the alert rules, the dashboard, the README, the man pages and maintctl's completion (from
# `make docs`).
files:
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
	install -D -m 0644 build/docs/maintd.8 $(DESTDIR)$(PREFIX)/share/man/man8/maintd.8
	install -D -m 0644 build/docs/maintctl.1 $(DESTDIR)$(PREFIX)/share/man/man1/maintctl.1
	install -D -m 0644 build/docs/maintd.toml.5 $(DESTDIR)$(PREFIX)/share/man/man5/maintd.toml.5
	install -D -m 0644 build/docs/maintctl $(DESTDIR)$(PREFIX)/share/bash-completion/completions/maintctl

# The man pages and maintctl's completion, generated from the command table, the config schema and doc/*.md
# (maintd/docs.py). DOCS_PYTHON: a python with maintd installed (the version is read from its metadata); the
# source tree's maintd and doc/ are the ones used.
DOCS_PYTHON ?= $(BIN)/python
docs:
	rm -rf build/docs
	PYTHONPATH=$(CURDIR) $(DOCS_PYTHON) -m maintd.docs build/docs

# --- the Debian package (README, "The Debian package") -------------------------------------------------------------
# `make deb` builds dist/maintd_<version>_<arch>.deb from a copy of this tree (dpkg-buildpackage writes beside the
# source directory, so the copy sits in build/deb), installing the build tools it needs first.
# pyproject's version, read without Python: make expands a recipe before its first line runs, so on a machine without
# python3 yet `make deb` would otherwise name its build before apt_missing had installed it.
VERSION   := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
LIBDIR    := /usr/lib/maintd
WHEELS    := build/wheels

deb:
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || \
		{ echo "make deb packages the files git knows of: run it in a git clone of maintd"; exit 1; }
	$(call apt_missing,$(DEB_BUILD) $(DEB_PACKAGING),--no-install-recommends)
	rm -rf build/deb && mkdir -p build/deb/maintd-$(VERSION) dist
	git ls-files -z --cached --others --exclude-standard | \
		tar --null -T - --ignore-failed-read -c | tar -x -C build/deb/maintd-$(VERSION)
	printf 'maintd (%s) unstable; urgency=medium\n\n  * Built from the maintd source tree (git %s).\n\n -- %s  %s\n' \
		'$(VERSION)' "$$(git rev-parse --short HEAD 2>/dev/null || echo none)" \
		'maintd developers <maintd@example.org>' "$$(git log -1 --format=%aD 2>/dev/null || date -R)" \
		> build/deb/maintd-$(VERSION)/debian/changelog
	cd build/deb/maintd-$(VERSION) && dpkg-buildpackage -b -us -uc
	rm -f dist/maintd_$(VERSION)_*.deb && mv build/deb/maintd_$(VERSION)_*.deb dist/
	lintian --fail-on error,warning --info dist/maintd_$(VERSION)_*.deb
	@ls -l dist/maintd_$(VERSION)_*.deb

# The wheels of maintd and every dependency it pins, fetched and built once per package build (systemd-python
# builds from source: libsystemd-dev, pkg-config, gcc, python3-dev). The only network access of the package's life.
wheels:
	rm -rf build/wheel-venv build/lib $(WHEELS)
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/pip wheel -q -c constraints.txt -w $(WHEELS) .

# The package's tree in $(DESTDIR), what debian/rules calls: a venv under $(LIBDIR) made with Debian's python3 from
# the wheels alone, relocatable (the scripts' shebangs say $(LIBDIR)/bin/python3), without byte code (compiled by
# postinst on the server, as dh_python3 does), pip, activate scripts or other commands; then the files beside it.
# Fails if a build path is left anywhere.
stage: wheels
	test -n "$(DESTDIR)"
	rm -rf $(DESTDIR)$(LIBDIR) && $(PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --no-index --find-links $(WHEELS) --no-compile maintd
	$(DESTDIR)$(LIBDIR)/bin/python -m pip uninstall -q -y pip setuptools
	find $(DESTDIR)$(LIBDIR)/bin -mindepth 1 ! -name 'python*' ! -name maintd ! -name maintctl -delete
	sed -i '1s|^#!.*|#!$(LIBDIR)/bin/python3|' $(DESTDIR)$(LIBDIR)/bin/maintd $(DESTDIR)$(LIBDIR)/bin/maintctl
	sed -i '/^command = /d' $(DESTDIR)$(LIBDIR)/pyvenv.cfg
	$(MAKE) --no-print-directory docs DOCS_PYTHON=$(DESTDIR)$(LIBDIR)/bin/python
	$(MAKE) --no-print-directory files PREFIX=/usr UNITDIR=/lib/systemd/system
	! grep -rl '$(DESTDIR)' $(DESTDIR)
