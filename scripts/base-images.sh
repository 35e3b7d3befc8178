#!/usr/bin/env bash
# Base images for `make images` on a machine that reaches no container registry.
#
# The Dockerfiles' defaults stay the public images (debian:bookworm-slim, rust:1.95-bookworm,
# gcr.io/distroless/cc-debian12:nonroot). When those can be neither found locally nor pulled,
# this script makes stand-ins from Debian packages (the only thing that may be downloaded) and
# prints the build arguments (NAME=VALUE lines) that select them:
#
#   clip-local/debian-slim:<key>           mmdebstrap --variant=minbase bookworm, apt lists removed
#   clip-local/distroless-cc-nonroot:<key> the libraries distroless/cc carries (libc6, libgcc-s1,
#                                           libstdc++6, libssl3, base-files, netbase), extracted
#                                           without maintainer scripts, plus a CA bundle made from
#                                           Debian's ca-certificates and passwd/group entries for
#                                           root and nonroot (65532), as distroless has
#
# With no registry there is also no Rust 1.95 image for the build stages (bookworm's rustc is
# 1.63), so the arguments also select BINARIES=host: the images take the binaries `make build` made
# on this machine (the ones the tests ran) into the same runtime stage.
#
# Idempotent: the stand-ins are tagged with the recipe's key; an existing tag is reused.
# CLIP_BASE_IMAGES=public forces the public images, =local the stand-ins; =auto (default) takes
# the public images when they are here, else stand-ins made before, else tries a pull (20 s).
set -euo pipefail
DOCKER=${DOCKER:-docker}
MODE=${CLIP_BASE_IMAGES:-auto}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump when the recipe or its package list changes.
KEY=bookworm-r2
SLIM=clip-local/debian-slim:$KEY
DISTROLESS=clip-local/distroless-cc-nonroot:$KEY

have() { $DOCKER image inspect "$1" >/dev/null 2>&1; }
reachable() { have "$1" || timeout 20 $DOCKER pull -q "$1" >/dev/null 2>&1; }

PUBLIC=(debian:bookworm-slim rust:1.95-bookworm gcr.io/distroless/cc-debian12:nonroot)
if [ "$MODE" = auto ]; then
  MODE=local
  if have "${PUBLIC[0]}" && have "${PUBLIC[1]}" && have "${PUBLIC[2]}"; then
    MODE=public
  elif ! { have "$SLIM" && have "$DISTROLESS"; }; then
    reachable "${PUBLIC[0]}" && reachable "${PUBLIC[1]}" && reachable "${PUBLIC[2]}" && MODE=public
  fi
fi
if [ "$MODE" = public ]; then
  echo "BINARIES=build"
  exit 0
fi

command -v mmdebstrap >/dev/null || {
  echo "==> installing mmdebstrap (apt)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ! have "$SLIM"; then
  echo "==> making $SLIM from Debian packages (mmdebstrap minbase, ~1 minute)" >&2
  mmdebstrap --variant=minbase --quiet \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    bookworm "$WORK/slim.tar" "$MIRROR"
  $DOCKER import --change 'CMD ["bash"]' "$WORK/slim.tar" "$SLIM" >/dev/null
fi

if ! have "$DISTROLESS"; then
  echo "==> making $DISTROLESS from Debian packages (extracted, no package manager)" >&2
  # The extract variant runs setup and extract hooks only (no customize hooks).
  mmdebstrap --variant=extract --quiet \
    --include=libc6,libgcc-s1,libstdc++6,libssl3,base-files,netbase,ca-certificates \
    --extract-hook='cat "$1"/usr/share/ca-certificates/mozilla/*.crt > "$1"/etc/ssl/certs/ca-certificates.crt' \
    --extract-hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" > "$1"/etc/passwd' \
    --extract-hook='printf "root:x:0:\nnonroot:x:65532:\n" > "$1"/etc/group' \
    --extract-hook='mkdir -p "$1"/home/nonroot "$1"/tmp && chown 65532:65532 "$1"/home/nonroot && chmod 1777 "$1"/tmp' \
    --extract-hook='rm -rf "$1"/usr/share/doc "$1"/usr/share/man "$1"/usr/share/info "$1"/usr/share/lintian "$1"/var/lib/dpkg "$1"/var/cache/* "$1"/var/log/*' \
    bookworm "$WORK/distroless.tar" "$MIRROR"
  $DOCKER import --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
    "$WORK/distroless.tar" "$DISTROLESS" >/dev/null
fi

# Stand-ins of earlier recipes are no longer used.
# (Only the stand-ins' own repositories: other clip-local images, such as KEDA's, stay.)
for old in $(for repo in "${SLIM%%:*}" "${DISTROLESS%%:*}"; do
               $DOCKER images --format '{{.Repository}}:{{.Tag}}' "$repo"; done | grep -v ":$KEY\$"); do
  $DOCKER rmi "$old" >/dev/null 2>&1 || true
done
echo "BINARIES=host"
echo "WORKER_RUNTIME_IMAGE=$SLIM"
echo "OPERATOR_RUNTIME_IMAGE=$DISTROLESS"
