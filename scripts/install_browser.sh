#!/bin/sh
# Headless Chromium for the app's browser test (tests/test_app.py): Debian's chromium and
# chromium-driver, installed only when missing and only where that is possible (root + apt-get).
# Never fails the build: where the browser cannot be installed the test skips and says why.
# Playwright's own browser download (`playwright install`) is not used: it needs the open internet.
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get here; tests/test_app.py's browser test will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_browser.sh: not root, cannot apt-get install chromium; the browser test will be skipped" >&2
    exit 0
fi
echo "install_browser.sh: installing Debian chromium + chromium-driver for the browser test"
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; then
    exit 0
fi
echo "install_browser.sh: apt-get could not install chromium; the browser test will be skipped" >&2
exit 0
