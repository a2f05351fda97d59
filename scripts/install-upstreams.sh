#!/usr/bin/env bash
# usage: scripts/install-upstreams.sh [--everything] [--test]
#
# Installs the real upstream MCP servers under .upstreams/ in the repo root (gitignored),
# from PyPI and the npm registry only. With no argument (what `make run` uses), only what
# the example config (examples/ledgergate.toml) serves:
#   .upstreams/whatsapp              venv: whatsapp-mcp-server (stdio; versions pinned in
#                                    WHATSAPP_PINS below)
# with --everything (`make bench`) also:
#   .upstreams/everything            npm: @modelcontextprotocol/server-everything (Streamable HTTP)
# with --test (`make test`) also everything above, plus:
#   .upstreams/conformance-server    npm deps of tests/conformance/server (+ its server.mjs)
#   .upstreams/conformance-suite     npm: the suite pinned in tests/conformance/suite/package.json
#   .upstreams/node22                npm: node@22, only when the node on PATH is older than 22
#                                    (the suite imports fs.globSync and crashes on node 20)
#
# Idempotent: every step writes a stamp file naming what it installed (pinned versions, hashes
# of the package.json files); a step whose stamp matches is skipped, so a second run is a fast
# no-op. Logs go to .upstreams/logs/<step>.log; a failing step exits non-zero naming its log.
# Env: INSTALL_TIMEOUT (seconds per network step, default 600), PYTHON (default python3),
#      NPM (default npm).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UP=$ROOT/.upstreams
LOGS=$UP/logs
T=${INSTALL_TIMEOUT:-600}
PYTHON=${PYTHON:-python3}
NPM=${NPM:-npm}
NPM_FLAGS=(--no-audit --no-fund --no-update-notifier --loglevel=warn)

WHATSAPP_PINS="whatsapp-mcp-server==0.2.1 mcp==1.12.0 pydantic==2.10.6"
EVERYTHING_PKG="@modelcontextprotocol/server-everything"
EVERYTHING_VERSION="2026.8.31"
NODE22_SPEC="node@22"

WITH_TEST=0
WITH_EVERYTHING=0
for arg in "$@"; do
  case $arg in
    --test) WITH_TEST=1; WITH_EVERYTHING=1 ;;
    --everything) WITH_EVERYTHING=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-upstreams: unknown argument: $arg (usage: $0 [--everything] [--test])" >&2; exit 2 ;;
  esac
done

mkdir -p "$UP" "$LOGS"

say() { echo "install-upstreams: $*"; }
die() { echo "install-upstreams: FAILED: $*" >&2; exit 1; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
# run LOG CMD...: run a step with its output in LOG; on failure show the tail and name the log.
run() {
  local log=$1 rc=0; shift
  "$@" >>"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "---- last lines of $log ----" >&2; tail -n 20 "$log" >&2 || true
    [ "$rc" -eq 124 ] && die "'$*' timed out after ${T}s (INSTALL_TIMEOUT); full log: $log"
    die "'$*' failed with exit status $rc; full log: $log"
  fi
}
sha() { sha256sum "$1" | cut -c1-16; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH (needed for: $2)"; }

# ---- whatsapp-mcp-server (stdio), its own venv with pinned deps ----
WA=$UP/whatsapp
WA_STAMP=$WA/.ledgergate-stamp
WA_WANT="$WHATSAPP_PINS"
if stamp_ok "$WA_STAMP" "$WA_WANT" && [ -x "$WA/bin/whatsapp-mcp" ]; then
  say "whatsapp: up to date ($WHATSAPP_PINS)"
elif [ -x "$WA/bin/whatsapp-mcp" ] && [ -x "$WA/bin/python" ] && "$WA/bin/python" - "$WHATSAPP_PINS" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
pins = dict(p.split("==") for p in sys.argv[1].split())
sys.exit(0 if all(m.version(n) == v for n, v in pins.items()) else 1)
EOF
then
  # installed by hand with the pinned versions: adopt it
  echo "$WA_WANT" >"$WA_STAMP"
  say "whatsapp: found an existing install with the pinned versions, stamped it ($WHATSAPP_PINS)"
else
  need "$PYTHON" "the whatsapp venv"
  log=$LOGS/whatsapp.log; : >"$log"
  say "whatsapp: creating venv $WA and pip-installing $WHATSAPP_PINS (log: $log)"
  rm -rf "$WA"
  run "$log" "$PYTHON" -m venv "$WA"
  # shellcheck disable=SC2086
  run "$log" timeout "$T" "$WA/bin/pip" install --disable-pip-version-check --no-input -q $WHATSAPP_PINS
  [ -x "$WA/bin/whatsapp-mcp" ] || die "whatsapp: $WA/bin/whatsapp-mcp missing after install; log: $log"
  echo "$WA_WANT" >"$WA_STAMP"
fi

if [ "$WITH_EVERYTHING" = 0 ]; then
  say "done: what the example serves (--everything adds the everything server for the bench, --test all the test tools)"
  exit 0
fi

# ---- @modelcontextprotocol/server-everything (Streamable HTTP) ----
need "$NPM" "the npm-installed upstreams"
EV=$UP/everything
EV_STAMP=$EV/.ledgergate-stamp
EV_WANT="$EVERYTHING_PKG@$EVERYTHING_VERSION"
ev_installed() {
  [ -x "$EV/node_modules/.bin/mcp-server-everything" ] \
    && grep -qs "\"version\": \"$EVERYTHING_VERSION\"" "$EV/node_modules/$EVERYTHING_PKG/package.json"
}
if stamp_ok "$EV_STAMP" "$EV_WANT" && ev_installed; then
  say "everything: up to date ($EV_WANT)"
elif ev_installed; then
  echo "$EV_WANT" >"$EV_STAMP"
  say "everything: found an existing install of $EV_WANT, stamped it"
else
  log=$LOGS/everything.log; : >"$log"
  say "everything: npm install $EV_WANT into $EV (log: $log)"
  mkdir -p "$EV"
  run "$log" timeout "$T" "$NPM" install --prefix "$EV" "${NPM_FLAGS[@]}" --save-exact "$EV_WANT"
  ev_installed || die "everything: mcp-server-everything missing after install; log: $log"
  echo "$EV_WANT" >"$EV_STAMP"
fi

if [ "$WITH_TEST" = 0 ]; then
  say "done (run with --test to add the conformance server, suite and node 22)"
  exit 0
fi

# ---- conformance upstream server (tests/conformance/server, official TypeScript SDK) ----
SRC=$ROOT/tests/conformance/server
CS=$UP/conformance-server
CS_STAMP=$CS/.ledgergate-stamp
[ -f "$SRC/package.json" ] && [ -f "$SRC/server.mjs" ] || die "missing $SRC/package.json or server.mjs"
CS_WANT="package.json sha256:$(sha "$SRC/package.json")"
if stamp_ok "$CS_STAMP" "$CS_WANT" && [ -d "$CS/node_modules/@modelcontextprotocol/sdk" ]; then
  say "conformance-server: deps up to date ($CS_WANT)"
else
  log=$LOGS/conformance-server.log; : >"$log"
  say "conformance-server: npm install of tests/conformance/server deps into $CS (log: $log)"
  mkdir -p "$CS"
  rm -f "$CS_STAMP"
  cp "$SRC/package.json" "$CS/package.json"
  run "$log" timeout "$T" "$NPM" install --prefix "$CS" "${NPM_FLAGS[@]}" --omit=dev
  [ -d "$CS/node_modules/@modelcontextprotocol/sdk" ] || die "conformance-server: SDK missing after install; log: $log"
  echo "$CS_WANT" >"$CS_STAMP"
fi
# ESM resolves imports next to the file, so the server runs from the env dir.
if ! cmp -s "$SRC/server.mjs" "$CS/server.mjs"; then
  cp "$SRC/server.mjs" "$CS/server.mjs"
  say "conformance-server: copied server.mjs next to its node_modules"
fi

# ---- the conformance suite, pinned in tests/conformance/suite/package.json ----
SUITE_SRC=$ROOT/tests/conformance/suite/package.json
SU=$UP/conformance-suite
SU_STAMP=$SU/.ledgergate-stamp
[ -f "$SUITE_SRC" ] || die "missing $SUITE_SRC"
SU_VERSION=$(sed -n 's/.*"@modelcontextprotocol\/conformance": *"\([^"]*\)".*/\1/p' "$SUITE_SRC")
[ -n "$SU_VERSION" ] || die "no @modelcontextprotocol/conformance version in $SUITE_SRC"
SU_WANT="@modelcontextprotocol/conformance@$SU_VERSION package.json sha256:$(sha "$SUITE_SRC")"
su_installed() {
  [ -f "$SU/node_modules/@modelcontextprotocol/conformance/dist/index.js" ] \
    && grep -qs "\"version\": \"$SU_VERSION\"" "$SU/node_modules/@modelcontextprotocol/conformance/package.json"
}
if stamp_ok "$SU_STAMP" "$SU_WANT" && su_installed; then
  say "conformance-suite: up to date (@modelcontextprotocol/conformance@$SU_VERSION)"
else
  log=$LOGS/conformance-suite.log; : >"$log"
  say "conformance-suite: npm install @modelcontextprotocol/conformance@$SU_VERSION into $SU (log: $log)"
  mkdir -p "$SU"
  rm -f "$SU_STAMP"
  cp "$SUITE_SRC" "$SU/package.json"
  run "$log" timeout "$T" "$NPM" install --prefix "$SU" "${NPM_FLAGS[@]}" --omit=dev
  su_installed || die "conformance-suite: the suite is missing after install; log: $log"
  echo "$SU_WANT" >"$SU_STAMP"
fi

# ---- node >= 22 for the suite ----
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
SYS_NODE=$(command -v node || true)
sys_major=0
[ -n "$SYS_NODE" ] && sys_major=$(node_major "$SYS_NODE")
N22=$UP/node22
N22_STAMP=$N22/.ledgergate-stamp
if [ "$sys_major" -ge 22 ]; then
  say "node22: not needed, $SYS_NODE is node $sys_major"
elif stamp_ok "$N22_STAMP" "$NODE22_SPEC" && [ "$(node_major "$N22/node_modules/.bin/node")" -ge 22 ]; then
  say "node22: up to date ($N22/node_modules/.bin/node, node $(node_major "$N22/node_modules/.bin/node"))"
else
  log=$LOGS/node22.log; : >"$log"
  say "node22: node on PATH is ${sys_major:-none}, npm install $NODE22_SPEC into $N22 (log: $log)"
  mkdir -p "$N22"
  rm -f "$N22_STAMP"
  run "$log" timeout "$T" "$NPM" install --prefix "$N22" "${NPM_FLAGS[@]}" "$NODE22_SPEC"
  [ "$(node_major "$N22/node_modules/.bin/node")" -ge 22 ] || die "node22: no node >= 22 after install; log: $log"
  echo "$NODE22_SPEC" >"$N22_STAMP"
fi

say "done"
