#!/usr/bin/env bash
# `make polyglot`: the toolchains tests/test_docs_polyglot.py needs to run the Node.js,
# Ruby and Go examples of docs/protocol.md ("Other languages").
#
# Idempotent and quick when everything is there (CI runs it on every build): apt is
# asked only for packages dpkg does not list as installed, and `npm ci` runs only when
# package.json or package-lock.json is newer than the last install.
#
# Where something cannot be installed (no apt, not root and no password-less sudo, no
# Node.js), it says what to install by hand and carries on: the tests skip with the same
# reason.  With REDPOOL_REQUIRE_POLYGLOT=1 (set by .ci/run) it fails instead, so CI never
# passes with an example that was not run.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Go 1.19+ (GOPATH mode finds redigo under /usr/share/gocode, offline), Ruby with redis-rb.
DEBS=(golang-go golang-github-gomodule-redigo-dev ruby ruby-redis)
NODE_DIR=tests/polyglot/node
# wait for another apt (unattended upgrades, say) rather than fail at once
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
required=${REDPOOL_REQUIRE_POLYGLOT:-}
problems=()

missing_debs() {
    local p
    for p in "${DEBS[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || echo "$p"
    done
}

install_debs() {
    if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
        problems+=("no apt here: install Ruby with the redis gem, and Go 1.18+ with redigo's source under /usr/share/gocode/src (where Debian's golang-github-gomodule-redigo-dev puts it)")
        return
    fi
    local missing
    missing=$(missing_debs | paste -sd ' ')
    if [ -z "$missing" ]; then
        echo "polyglot: Debian packages present (${DEBS[*]})"
        return
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            problems+=("cannot run apt-get (not root, no password-less sudo): sudo apt-get install $missing")
            return
        fi
    fi
    echo "polyglot: installing $missing"
    # shellcheck disable=SC2086  # $missing is a list of package names
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install "${APT_OPTS[@]}" $missing; then
        # a machine whose package lists were never fetched (or are stale) knows no such
        # package yet: fetch them once, then try again
        "${sudo[@]}" apt-get update -q -o DPkg::Lock::Timeout=300 || true
        # shellcheck disable=SC2086
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install "${APT_OPTS[@]}" $missing \
            || problems+=("apt-get install $missing failed (see above)")
    fi
}

install_node() {
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        problems+=("Node.js and npm are not installed: install Node.js 20 or newer")
        return
    fi
    local stamp=$NODE_DIR/node_modules/.package-lock.json   # written by npm ci itself
    if [ -f "$stamp" ] && [ -f "$NODE_DIR/node_modules/redis/package.json" ] \
            && [ "$stamp" -nt "$NODE_DIR/package-lock.json" ] \
            && [ "$stamp" -nt "$NODE_DIR/package.json" ]; then
        echo "polyglot: $NODE_DIR/node_modules up to date"
        return
    fi
    echo "polyglot: npm ci in $NODE_DIR"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=warn) \
        || problems+=("npm ci in $NODE_DIR failed (see above)")
}

install_debs
install_node

if [ ${#problems[@]} -eq 0 ]; then
    echo "polyglot: ready"
    exit 0
fi
for p in "${problems[@]}"; do echo "polyglot: $p" >&2; done
if [ -n "$required" ] && [ "$required" != 0 ]; then
    echo "polyglot: REDPOOL_REQUIRE_POLYGLOT is set, so this is an error" >&2
    exit 1
fi
echo "polyglot: the examples of these toolchains will be skipped by the tests" >&2
