#!/usr/bin/env bash
# make demo: a throw-away deploy tree, a memcached and maintd on it; two releases uploaded with rsync go live.
set -euo pipefail

work=$(mktemp -d /tmp/maintd-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
memcached -l 127.0.0.1 -p "$port" -U 0 -u root & pids+=($!)

mkdir -p "$work/srv/releases" "$work/srv/shared/config" "$work/upload"
echo "production: {adapter: sqlite3}" > "$work/srv/shared/config/database.yml"
cat > "$work/shop.toml" <<TOML
app = "shop"
root = "$work/srv"
[upload]
quiet_period = 2.0
[shared]
files = ["config/database.yml"]
[memcached]
servers = ["127.0.0.1:$port"]
[control]
socket = "$work/shop.sock"
[state]
dir = "$work/state"
TOML

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
release() {  # a tiny Rack app that says which release it is
  local dir="$work/upload/$1"
  mkdir -p "$dir/public" "$dir/config"
  echo "$1" > "$dir/REVISION"
  echo "run ->(env) { [200, {}, [\"release $1\\n\"]] }" > "$dir/config.ru"
  echo "<h1>release $1</h1>" > "$dir/public/index.html"
}

maintd check --config "$work/shop.toml"
say "starting maintd (console log below)"
maintd run --config "$work/shop.toml" --log-format console & pids+=($!)
until [ -d "$work/state" ]; do sleep 0.1; done
sleep 1

say "upload 1: rsync, then the marker (goes live at once)"
release 20261123090000
rsync -a "$work/upload/20261123090000/" "$work/srv/releases/20261123090000/"
touch "$work/upload/.maintd-ready"
rsync -a "$work/upload/.maintd-ready" "$work/srv/releases/20261123090000/"
until [ "$(readlink "$work/srv/current" 2>/dev/null)" = "releases/20261123090000" ]; do sleep 0.1; done
sleep 0.5

say "upload 2: rsync without a marker (goes live after 2 s of quiet)"
release 20261123100000
rsync -a "$work/upload/20261123100000/" "$work/srv/releases/20261123100000/"
until [ "$(readlink "$work/srv/current" 2>/dev/null)" = "releases/20261123100000" ]; do sleep 0.1; done
sleep 0.5

say "the tree now"
ls -l "$work/srv" | sed 1d
echo "current/REVISION: $(cat "$work/srv/current/REVISION")"
echo "revisions.log:"; sed 's/^/  /' "$work/srv/revisions.log"
