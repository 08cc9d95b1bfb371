#!/bin/sh
# Installs the Debian packages the test suite needs: a real Prometheus server for the
# scrape test, a real Redis server for the cluster tests (each test starts its own on a
# free port), and Chromium for the browser tests (driven by playwright-core, which is
# told to use /usr/bin/chromium instead of downloading a browser of its own), with pgrep
# to check that no Chromium process outlives a test. Does nothing when they are present.
set -eu
missing=""
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v pgrep >/dev/null 2>&1 || missing="$missing procps"
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "phxbroker tests need:$missing (install them with your package manager)" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages:$missing"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
