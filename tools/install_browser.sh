#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for tests/interpret/test_browser.py (headless
# Chromium), only when /usr/bin/chromium or /usr/bin/chromedriver is missing. Uses sudo only when
# not root.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: apt-get not found; install chromium and chromedriver by hand" \
       "(or set JAXSAE_SKIP_BROWSER=1 to skip the browser tests)." >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver
/usr/bin/chromium --version
/usr/bin/chromedriver --version
