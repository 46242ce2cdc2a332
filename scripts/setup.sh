#!/usr/bin/env bash
# Installs what dsv3 needs to build and test on Debian 12 (run as root, or with sudo available).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config   # toolchain
  nlohmann-json3-dev libpcre2-dev                       # JSON, Unicode regex (tokenizer)
  libcpp-httplib-dev                                    # HTTP server
  googletest libgtest-dev                               # tests
  clang libclang-rt-14-dev libomp-dev                   # libFuzzer targets, OpenMP for clang
  npm python3 python3-jinja2                            # tokenizer fetch, chat-template checks
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
