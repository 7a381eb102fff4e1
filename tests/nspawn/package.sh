#!/bin/bash
# Runs inside a fresh Debian 12 booted with systemd (tests/test_package.py): installs maintd's package as an operator
# would, deploys, upgrades it while a deploy is held in a hook, removes it, purges it; records what it saw in
# /results/steps (KEY=VALUE) for the test to assert on. /debs/old and /debs/new hold the two builds.
set -u
out=/results
step() { echo "$1=$2" >> "$out/steps"; }
exists() { for path; do if [ -e "$path" ]; then step "exists:$path" yes; else step "exists:$path" no; fi; done; }
as_deploy() { su deploy -s /bin/bash -c "$1"; }
status() { maintctl --config /etc/maintd/shop.toml status --json 2>/dev/null; }
field() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)" 2>/dev/null; }
# how many `maintd run` daemons are alive (the root is minimal: no procps); the pattern does not match itself
daemons() { for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done | grep -c '[/]maintd run'; }
until_true() { for _ in $(seq 600); do eval "$1" && return 0; sleep 0.1; done; return 1; }  # 60 s at most

# --- install: files in place, nothing running ---------------------------------------------------------------------
apt install -y /debs/old/maintd_*.deb > "$out/install.log" 2>&1; step install $?  # the README's line
step version "$(maintd --version)"
step maintctl_version "$(maintctl --version)"
exists /usr/bin/maintd /usr/bin/maintctl /lib/systemd/system/maintd@.service /lib/systemd/system/maintd@.socket \
       /etc/maintd/example.toml /etc/maintd/web/nginx/maintd.conf /etc/maintd/web/apache2/maintd.conf \
       /usr/share/maintd/maintenance.html /usr/share/maintd/capistrano/maintd.rake \
       /usr/share/maintd/rails/maintd_cache.rb /usr/share/maintd/prometheus/maintd.rules.yml \
       /usr/share/maintd/grafana/maintd.json /usr/share/bash-completion/completions/maintctl \
       /usr/share/doc/maintd/README.md
step conffiles "$(dpkg-query -W -f='${Conffiles}' maintd | awk '{print $1}' | tr '\n' ' ')"
for page in maintd.8 maintctl.1 maintd.toml.5; do
  step "man:$page" "$(man -w "${page%.*}" "${page##*.}" 2>/dev/null)"
done
MANWIDTH=80 man 5 maintd.toml 2>/dev/null | grep -c "keep_releases = 5" > "$out/man_keep_releases"
step completion "$(bash -c 'source /usr/share/bash-completion/bash_completion; _completion_loader maintctl; complete -p maintctl')"
step units_running "$(systemctl list-units --no-legend --plain --all 'maintd@*' | grep -c ' active ')"
step units_enabled "$(find /etc/systemd/system -name 'maintd@*' | wc -l)"
step doc "$(systemctl show -p Documentation --value maintd@shop.service)"

# --- an app for deploy: an upload goes live -----------------------------------------------------------------------
# the README's install section, line by line; the test's $EDITOR uncomments the example's [hooks] and sets a hook
useradd --create-home --shell /bin/bash deploy
install -d -o deploy -g deploy /srv/shop /srv/shop/releases /srv/shop/shared
cp /etc/maintd/example.toml /etc/maintd/shop.toml
# a release that holds a file `hold` waits in this hook until shared/go exists: a deploy in progress, on demand
hook='before_swap = [["sh", "-c", "if [ -e hold ]; then while [ ! -e ../../shared/go ]; do sleep 0.1; done; fi"]]'
sed -i -e 's/^#\[hooks\]/[hooks]/' -e "s|^#before_swap = .*|$hook|" /etc/maintd/shop.toml
step edited "$(grep -c -e '^\[hooks\]' -e '^before_swap = ' /etc/maintd/shop.toml)"
maintd check --config /etc/maintd/shop.toml > "$out/check.txt" 2>&1; step check $?
systemctl enable --now maintd@shop.socket maintd@shop.service > "$out/enable.log" 2>&1; step enable $?
upload() {  # as the deploy user: staged under a dot name, renamed, marker last
  as_deploy "mkdir /srv/shop/releases/.incoming-$1 && echo $1 > /srv/shop/releases/.incoming-$1/REVISION $2 &&
             mv /srv/shop/releases/.incoming-$1 /srv/shop/releases/$1 && touch /srv/shop/releases/$1/.maintd-ready"
}
upload r1 ""
until_true '[ "$(status | field "d[\"current\"]")" = r1 ] && [ "$(status | field "d[\"deploying\"]")" = None ]'
step live_r1 $?
as_deploy "maintctl --config /etc/maintd/shop.toml status" > "$out/status_r1.txt" 2>&1; step status_as_deploy $?
old_pid=$(systemctl show -p MainPID --value maintd@shop.service)
ls /var/lib/maintd/shop > "$out/state_before"  # idle: every file here must outlive the upgrade

# --- upgrade while a deploy waits in its hook ---------------------------------------------------------------------
# the deploy will hold the upgrade's stop past the unit's TimeoutStopSec, shortened to 3 s for the test: maintd must
# extend it for as long as the deploy runs, or systemd kills it mid-deploy
dropin=/etc/systemd/system/maintd@shop.service.d
mkdir -p $dropin && printf '[Service]\nTimeoutStopSec=3s\n' > $dropin/short-stop.conf && systemctl daemon-reload
upload r2 "&& touch /srv/shop/releases/.incoming-r2/hold"
until_true '[ "$(status | field "(d[\"deploying\"] or {}).get(\"step\")")" = hooks_before ]'; step r2_held $?
[ -e /var/lib/maintd/shop/deploy.json ] && step journal_during_hold yes  # the deploy journal of r2, in progress
apt install -y /debs/new/maintd_*.deb > "$out/upgrade.log" 2>&1 &
apt_pid=$!
until_true '[ "$(systemctl show -p ActiveState --value maintd@shop.service)" = deactivating ]'; step stopping $?
# prerm's stop is waiting for the held deploy: apt is still at it, and the old files are still the ones installed
kill -0 $apt_pid 2>/dev/null; step apt_waits $?
step during_stop "$(systemctl show -p ActiveState --value maintd@shop.service) $(readlink /srv/shop/current)"
step version_during_stop "$(maintd --version)"
sleep 6  # the fault is time itself: twice the shortened TimeoutStopSec
step held_past_timeout "$(systemctl show -p ActiveState --value maintd@shop.service)"
as_deploy "touch /srv/shop/shared/go"
wait $apt_pid; step upgrade $?
until_true '[ -n "$(status)" ]'; step back $?
status > "$out/status_after.json"
step new_pid_differs "$([ "$(systemctl show -p MainPID --value maintd@shop.service)" != "$old_pid" ] && echo yes)"
step active_after "$(systemctl is-active maintd@shop.service) $(systemctl is-active maintd@shop.socket)"
maintctl --config /etc/maintd/shop.toml history --json > "$out/history.json" 2>&1
ls /var/lib/maintd/shop > "$out/state_after"
step version_after "$(maintd --version)"
rm -r $dropin && systemctl daemon-reload

# --- remove keeps the configuration, the state and the trees; purge removes the first two -------------------------
step running_before_remove "$(daemons)"
apt-get remove -y -q maintd > "$out/remove.log" 2>&1; step remove $?
step running_after_remove "$(daemons)"
for path in /usr/bin/maintd /etc/maintd/shop.toml /etc/maintd/example.toml /var/lib/maintd/shop /srv/shop/releases/r2; do
  [ -e "$path" ] && step "after_remove:$path" yes || step "after_remove:$path" no
done
apt-get purge -y -q maintd > "$out/purge.log" 2>&1; step purge $?
for path in /etc/maintd /var/lib/maintd /srv/shop/releases/r1 /srv/shop/releases/r2 /srv/shop/current; do
  [ -e "$path" ] && step "after_purge:$path" yes || step "after_purge:$path" no
done
step enabled_after_purge "$(find /etc/systemd/system -name 'maintd@*' | wc -l)"
journalctl --no-pager -n 300 > "$out/journal.txt"
step done yes
