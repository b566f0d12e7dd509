#!/bin/sh
# Builds a Cloudflare-shaped module into a wasi:http/proxy component:
#   examples/js/build.sh hello.js ../../target/workers/hello-js.wasm
# Needs Node.js and npm; installs the pinned componentize-js (package-lock.json).
set -eu
cd "$(dirname "$0")"
src=$1
out=$2
[ -d node_modules ] || npm ci --no-audit --no-fund
# componentize-js takes one entry module: the adapter imports the Worker as ./worker.js.
cp "$src" worker.js
trap 'rm -f worker.js' EXIT
node_modules/.bin/componentize-js --wit wit --world-name user-worker -o "$out" adapter.js
