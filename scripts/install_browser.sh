#!/usr/bin/env bash
# Install Debian's chromium for the browser test (Playwright cannot download its own browser offline).
# Needs root and apt-get; elsewhere it says why and the browser test skips.
set -uo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: /usr/bin/chromium is missing and this is not a root Debian shell; the browser test will skip" >&2
    exit 0
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "warning: could not install chromium; the browser test will skip (fail under CI)" >&2
