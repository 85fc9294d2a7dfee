#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/test_web.py): Debian's chromium package.
#
#   bash .ci/chromium.sh    # installs it when /usr/bin/chromium is missing (as root), else does nothing
#
# Playwright drives it with executable_path="/usr/bin/chromium": Playwright's own browser download
# is never used (it cannot reach its download host from CI).
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    log "chromium is not installed and we are not root (apt-get install chromium)"
    exit 1
fi
log "installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium >&2
log "$(/usr/bin/chromium --version 2>/dev/null)"
