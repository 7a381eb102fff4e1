#!/bin/bash
# Runs inside a systemd-nspawn container booted with a real systemd as PID 1 (tests/test_systemd.py): the shipped
# units, a tree owned by a `deploy` user who uploads a release whose hooks probe what they may and may not do.
set -u
bin=$1
out=/results
step() { echo "$1=$2" >> "$out/steps"; }
as_deploy() { setpriv --reuid=deploy --regid=deploy --init-groups "$@"; }

# The people: deploy uploads and owns the app; other owns another app on the same machine.
printf 'u deploy - "deploy" /home/deploy /bin/bash\nu other - "other" /home/other /bin/bash\n' | systemd-sysusers -
mkdir -p /home/deploy/.rbenv/shims /home/other /srv/demo/releases /srv/demo/shared /srv/other
# Trees an app may live in besides /srv: one in deploy's home, one elsewhere made writable by the README's drop-in.
mkdir -p /home/deploy/apps/shop /opt/apps/shop && chown deploy: /opt/apps/shop
# A Ruby installed in the user's home, as rbenv does it: a shim that says so, then runs the system's Ruby.
printf '#!/bin/sh\necho "ruby from /home/deploy" >&2\nexec /usr/bin/ruby "$@"\n' > /home/deploy/.rbenv/shims/ruby
chmod 755 /home/deploy/.rbenv/shims/ruby
chown -R deploy: /home/deploy /srv/demo
chown other: /home/other /srv/other
# Debian's alternatives live in /etc, which this container has empty: the JVM by its own path.
ln -s "$(ls -d /usr/lib/jvm/*/bin/java | head -1)" /srv/demo/shared/java
# A setuid-root program that tells its effective uid: what su or sudo would be, minus their own refusals.
cp /usr/bin/id /srv/setuid-root-id && chmod 4755 /srv/setuid-root-id

systemctl start maintd@demo.socket maintd@demo.service; step start $?
step active_after_start "$(systemctl is-active maintd@demo.service)"
step protect_home "$(systemctl show maintd@demo.service -p ProtectHome --value)"

staging=/srv/demo/releases/.incoming-r1
as_deploy mkdir -p "$staging/bin"
as_deploy cp /check/probe.sh "$staging/bin/probe"
as_deploy chmod 755 "$staging/bin/probe"
as_deploy sh -c "echo r1 > $staging/REVISION && touch $staging/.maintd-ready"
as_deploy mv "$staging" /srv/demo/releases/r1
for _ in $(seq 600); do
  case "$(systemctl show maintd@demo.service -p StatusText --value)" in idle*live\ r1) break ;; esac
  sleep 0.1
done
step current "$(readlink /srv/demo/current)"
step maintenance_after "$(test -e /srv/demo/current/tmp/maintenance.txt && echo on || echo off)"
for path in /etc/written-by-hook /root/written-by-hook /srv/other/written-by-hook /srv/escaped-systemd-run \
            /srv/escaped-su; do
  step "exists:$path" "$(test -e "$path" && echo yes || echo no)"
done
cp /srv/demo/shared/hook-* "$out/"  # the service sees /results read-only, like the rest of the system
systemd-analyze security maintd@demo.service --no-pager | grep "Overall exposure" > "$out/security"
systemctl stop maintd@demo.service; step stop $?
journalctl -u maintd@demo -o json --no-pager > "$out/journal.json"
journalctl --no-pager -n 300 > "$out/journal.txt"
step done yes
