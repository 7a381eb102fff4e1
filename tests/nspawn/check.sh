#!/bin/bash
# Runs inside a systemd-nspawn container booted with a real systemd as PID 1 (see tests/test_systemd.py).
# Drives the shipped units as an operator would and leaves what it saw in /results for the test to assert on.
set -u
bin=$1
out=/results
step() { echo "$1=$2" >> "$out/steps"; }

mkdir -p /srv/demo/releases /srv/demo/shared
systemctl start maintd@demo.socket maintd@demo.service; step start $?
step active_after_start "$(systemctl is-active maintd@demo.service)"
systemctl show maintd@demo.service -p StatusText --value > "$out/status_text_ready"

mkdir -p /srv/demo/releases/.incoming-r1
echo r1 > /srv/demo/releases/.incoming-r1/REVISION
touch /srv/demo/releases/.incoming-r1/.maintd-ready
mv /srv/demo/releases/.incoming-r1 /srv/demo/releases/r1
for _ in $(seq 300); do [ "$(readlink /srv/demo/current)" = releases/r1 ] && break; sleep 0.1; done
step current "$(readlink /srv/demo/current)"
for _ in $(seq 300); do  # the swap is not the end of the deploy: wait until maintd says it is idle again
  case "$(systemctl show maintd@demo.service -p StatusText --value)" in idle*) break ;; esac
  sleep 0.1
done

timeout 20 "$bin/maintctl" --socket /run/maintd/demo.sock status --json > "$out/status.json"; step maintctl $?
systemctl reload maintd@demo.service; step reload $?
step active_after_reload "$(systemctl is-active maintd@demo.service)"
systemctl show maintd@demo.service -p StatusText --value > "$out/status_text_reloaded"
systemctl stop maintd@demo.service; step stop $?
step active_after_stop "$(systemctl is-active maintd@demo.service)"
step result "$(systemctl show maintd@demo.service -p Result --value)"
journalctl -u maintd@demo -o json --no-pager > "$out/journal.json"
journalctl --no-pager -n 200 > "$out/journal.txt"
step done yes
