#!/usr/bin/env bash
# System packages the build needs that a fresh machine of this kind lacks (Debian's apt):
#   nasm   - libjpeg-turbo's SIMD code (turbojpeg-sys builds it from source)
#   cmake  - libjpeg-turbo's build
#   lua5.1, lua5.4 - run the Argo CD health check in its tests (Argo CD embeds gopher-lua,
#            a Lua 5.1)
# Idempotent: installs only what is missing.
set -euo pipefail
missing=()
command -v nasm >/dev/null 2>&1 || missing+=(nasm)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v lua5.4 >/dev/null 2>&1 || missing+=(lua5.4)
command -v lua5.1 >/dev/null 2>&1 || missing+=(lua5.1)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "==> installing system packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
}
