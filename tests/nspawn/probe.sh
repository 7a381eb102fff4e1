#!/bin/bash
# A hook (and the restart command) shipped inside the release, as bin/rails would be: it records what it is and what
# the app's tooling can do, then tries every route out of its user's rights. `$1` says which run this is.
exec > "/srv/demo/shared/hook-$1" 2>&1
check() { name=$1; shift; "$@" > /dev/null 2>&1; echo "$name=$?"; }
echo "user=$(id -un)"
echo "uid=$(id -u)"
echo "groups=$(id -Gn)"
echo "home=$HOME"; echo "USER=$USER"; echo "LOGNAME=$LOGNAME"; echo "SHELL=$SHELL"; echo "greeting=$GREETING"
echo "node=$(node -e 'console.log(require("os").cpus().length > 0 ? "ok" : "no cpus")' 2>&1 | tail -1)"
check java /srv/demo/shared/java -Xmx64m -version
echo "yjit=$(ruby --yjit -e 'print RubyVM::YJIT.enabled?' 2>/dev/null)"
echo "ruby_from=$(ruby -e 'print 1' 2>&1 >/dev/null)"
git config --global user.name "Deploy Bot" && echo "git=$(git config --global user.name)"
check cp_a cp -a bin/probe /tmp/probe-copy
echo "cp_a_owner=$(stat -c %U /tmp/probe-copy)"
check install_o install -o deploy -m 0644 REVISION /tmp/revision-copy
check tmp_cache sh -c 'mkdir -p tmp/cache && touch tmp/cache/compiled'
check write_home_tree touch "/home/deploy/apps/shop/written-by-hook-$1"
check write_dropin_tree touch "/opt/apps/shop/written-by-hook-$1"
check write_etc sh -c 'echo x > /etc/written-by-hook'
check write_root sh -c 'echo x > /root/written-by-hook'
check write_other_app sh -c 'echo x > /srv/other/written-by-hook'
check systemd_run systemd-run --wait --pipe sh -c 'id > /srv/escaped-systemd-run'
check su sh -c "su -c 'id > /srv/escaped-su' root < /dev/null"
echo "setuid_root_id=$(/srv/setuid-root-id -u)"  # 0 would mean a setuid program made it root
check signal_pid1 kill -0 1
check maintctl_maintenance_on "$MAINTCTL" --socket /run/maintd/demo.sock maintenance on --reason "from a hook"
echo "probe=done"
