#!/bin/bash
# Runs inside a fresh Debian 12 booted with systemd (tests/test_package.py): follows the README's install section line
# by line (/results/readme-lines, handed over by the test; its `make deb` ran on the host and left the build in
# /root/maintd/dist), deploys, upgrades while a deploy is held in a hook, removes, purges; records what it saw in
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
active_units() { systemctl list-units --no-legend --plain --all 'maintd@*' | grep -c ' active '; }
until_true() { for _ in $(seq 600); do eval "$1" && return 0; sleep 0.1; done; return 1; }  # 60 s at most
complete_maintctl() {  # what bash-completion offers for the last of the words given after maintctl, as <TAB> would
  bash -c 'source /usr/share/bash-completion/bash_completion; _completion_loader maintctl
           COMP_WORDS=(maintctl "$@"); COMP_CWORD=$#; COMP_LINE="maintctl $*"; COMP_POINT=${#COMP_LINE}; _maintctl
           echo "${COMPREPLY[*]}"' _ "$@"
}

installed() {  # right after the README's `apt install`: the files in place, nothing running
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
  step complete_sta "$(complete_maintctl sta)"
  step complete_maintenance "$(complete_maintctl maintenance '')"
  step units_running "$(active_units)"
  step units_enabled "$(find /etc/systemd/system -name 'maintd@*' | wc -l)"
  step doc "$(systemctl show -p Documentation --value maintd@shop.service)"
  # an upgrade with no instance to stop (the same build again) starts nothing and complains of nothing
  apt install --reinstall -y ./dist/maintd_*.deb > "$out/reinstall.log" 2>&1; step reinstall $?
  step units_running_after_reinstall "$(active_units)"
}

# --- the README's install section, line by line -------------------------------------------------------------------
# the test's $EDITOR: uncomments the example's [hooks] and sets a hook; a release that holds a file `hold` waits in
# it until shared/go exists: a deploy in progress, on demand
cat > /usr/local/bin/edit-config <<'SH'
#!/bin/sh
hook='before_swap = [["sh", "-c", "if [ -e hold ]; then while [ ! -e ../../shared/go ]; do sleep 0.1; done; fi"]]'
sed -i -e 's/^#\[hooks\]/[hooks]/' -e "s|^#before_swap = .*|$hook|" "$1"
SH
chmod +x /usr/local/bin/edit-config
export EDITOR=/usr/local/bin/edit-config
cd /root/maintd
n=0
while IFS= read -r line; do
  n=$((n + 1))
  bash -c "$line" > "$out/readme-$n.log" 2>&1 < /dev/null; step "readme:$n" $?
  case "$line" in "apt install"*) installed ;; esac
done < "$out/readme-lines"
step edited "$(grep -c -e '^\[hooks\]' -e '^before_swap = ' /etc/maintd/shop.toml)"

# --- an upload goes live ------------------------------------------------------------------------------------------
upload() {  # as the deploy user: staged under a dot name, renamed, marker last
  as_deploy "mkdir /srv/shop/releases/.incoming-$1 && echo $1 > /srv/shop/releases/.incoming-$1/REVISION $2 &&
             mv /srv/shop/releases/.incoming-$1 /srv/shop/releases/$1 && touch /srv/shop/releases/$1/.maintd-ready"
}
upload r1 ""
until_true '[ "$(status | field "d[\"current\"]")" = r1 ] && [ "$(status | field "d[\"deploying\"]")" = None ]'
step live_r1 $?
as_deploy "maintctl --config /etc/maintd/shop.toml status" > "$out/status_r1.txt" 2>&1; step status_as_deploy $?
ls /var/lib/maintd/shop > "$out/state_before"  # idle: every file here must outlive the upgrade
cp /var/lib/maintd/shop/history.jsonl "$out/history_before.jsonl"  # and the history only grows

# --- an upgrade dpkg must abort (the new build with a file of bash's in it): the instances run again -------------
dpkg-deb -R /debs/new/maintd_*.deb /tmp/conflicting
install -D /usr/share/doc/bash/copyright /tmp/conflicting/usr/share/doc/bash/copyright
dpkg-deb -b /tmp/conflicting /tmp/conflicting.deb > /dev/null
apt install -y /tmp/conflicting.deb > "$out/aborted.log" 2>&1; step aborted $?
step active_after_abort "$(systemctl is-active maintd@shop.service) $(systemctl is-active maintd@shop.socket)"
step version_after_abort "$(dpkg-query -W -f='${Version}' maintd) $(maintd --version)"
step current_after_abort "$(status | field 'd["current"]')"
old_pid=$(systemctl show -p MainPID --value maintd@shop.service)

# --- upgrade while a deploy waits in its hook ---------------------------------------------------------------------
# the deploy will hold the upgrade's stop past the unit's TimeoutStopSec, shortened to 3 s for the test: maintd must
# extend it for as long as the deploy runs, or systemd kills it mid-deploy
dropin=/etc/systemd/system/maintd@shop.service.d
mkdir -p $dropin && printf '[Service]\nTimeoutStopSec=3s\n' > $dropin/short-stop.conf && systemctl daemon-reload
step stop_timeout "$(systemctl show -p TimeoutStopUSec --value maintd@shop.service)"
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
cp /var/lib/maintd/shop/history.jsonl "$out/history_after.jsonl"
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
