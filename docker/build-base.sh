#!/usr/bin/env bash
# The images DitePose's Dockerfiles and docker-compose.yml start from, for a machine that cannot
# pull from a registry (air-gapped, or no Docker Hub). Each is skipped when it is already present,
# so running this again costs a few `docker image inspect` calls.
#
#   docker/build-base.sh              what is missing: pull it, else build it locally
#   docker/build-base.sh --no-pull    never try a registry (saves the pull timeouts)
#   docker/build-base.sh --force      rebuild the local ones even when present
#
# Built here (needs root for debootstrap, a Docker engine, and Debian's package mirror):
#   debian:bookworm-slim                 `debootstrap --variant=minbase bookworm` from the mirror apt
#                                        uses (DEBIAN_MIRROR overrides), then `docker import`: what
#                                        the official image is built from
#   ditepose-base/python:3.11-bookworm   debian:bookworm-slim + Debian's python3 (3.11) and venv;
#                                        pass it as --build-arg PYTHON_IMAGE=... to Dockerfile.cpu
#                                        (where Docker Hub answers, the default python:3.11-slim-bookworm
#                                        is used instead and this image is not needed)
#   <redis image of docker-compose.yml>       stand-in from Debian's redis-server (7.0), same name
#   <prometheus image of docker-compose.yml>  stand-in from Debian's prometheus (2.42), same name
# A stand-in is built only when the official image cannot be pulled; it carries the label
# io.ditepose.standin saying what it is (`docker image inspect -f '{{json .Config.Labels}}' NAME`).
# Remove one (`docker rmi NAME`) and `docker compose pull` once a registry is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."

pull=1 force=0
for arg in "$@"; do
  case $arg in
    --no-pull) pull=0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { echo "build-base: $*"; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
compose_image() {  # the image: of a service in docker-compose.yml
  awk -v svc="  $1:" '$0 == svc {found=1; next} found && /^  [a-z]/ {exit} found && $1 == "image:" {print $2; exit}' \
    docker-compose.yml
}
try_pull() {
  [ "$pull" = 1 ] || return 1
  timeout "${DITEPOSE_PULL_TIMEOUT_S:-30}" docker pull -q "$1" >/dev/null 2>&1
}

DEBIAN_IMAGE=${DEBIAN_IMAGE:-debian:bookworm-slim}
PYTHON_BASE=${PYTHON_BASE:-ditepose-base/python:3.11-bookworm}
REDIS_IMAGE=${REDIS_IMAGE:-$(compose_image redis)}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-$(compose_image prometheus)}
[ -n "$REDIS_IMAGE" ] && [ -n "$PROMETHEUS_IMAGE" ] || { echo "cannot read the images of docker-compose.yml" >&2; exit 1; }

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  # the first main-archive URI apt is configured with (deb822 .sources or one-line .list)
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -v -- '-security' | head -n1 || true)
  [ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_debian() {
  local mirror rootfs start
  mirror=$(debian_mirror)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] \
    || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  [ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
  rootfs=$(mktemp -d /tmp/ditepose-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  start=$(date +%s)
  say "$DEBIAN_IMAGE: debootstrap --variant=minbase bookworm from $mirror"
  PATH=$PATH:/usr/sbin debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  # As the official slim image: updates and security in the sources, no docs, man pages or apt lists.
  local security=${mirror%/debian}/debian-security
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/*/changelog* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change "LABEL io.ditepose.standin=\"debootstrap --variant=minbase bookworm from $mirror (built by docker/build-base.sh)\"" \
    - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  say "$DEBIAN_IMAGE: built in $(($(date +%s) - start)) s ($(docker image inspect -f '{{.Size}}' "$DEBIAN_IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

build_from_dockerfile() {  # name, what, then docker build arguments
  local name=$1 what=$2 start
  shift 2
  start=$(date +%s)
  say "$name: building $what"
  docker build --network host --force-rm -q -t "$name" "$@" >/dev/null 2> >(grep -v -E "DEPRECATED: The legacy builder|Install the buildx|docs.docker.com/go/buildx|^\s*$" >&2)
  say "$name: built in $(($(date +%s) - start)) s ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

# ---------------------------------------------------------------- Debian
if [ "$force" = 1 ] || ! have "$DEBIAN_IMAGE"; then
  if [ "$force" = 0 ] && try_pull "$DEBIAN_IMAGE"; then
    say "$DEBIAN_IMAGE: pulled"
  else
    build_debian
  fi
else
  say "$DEBIAN_IMAGE: present"
fi

# ---------------------------------------------------------------- Python (Debian's 3.11)
if [ "$force" = 1 ] || ! have "$PYTHON_BASE"; then
  # Like python:3.11-slim-bookworm for our Dockerfiles: `python` on PATH, with venv and pip. It
  # also trusts what this host trusts: the host's CA bundle (CA_BUNDLE, default the system one;
  # CA_BUNDLE= leaves it out) joins Debian's, and pip is pointed at the result (PIP_CERT), so
  # builds work behind a TLS-intercepting proxy wherever the host's own pip does.
  context=$(mktemp -d /tmp/ditepose-python-base.XXXXXX)
  CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
  if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then
    cp "$CA_BUNDLE" "$context/host-ca-bundle.crt"
  else
    : >"$context/host-ca-bundle.crt"
  fi
  cat >"$context/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
LABEL io.ditepose.standin="Debian bookworm python3 (3.11) + venv on $DEBIAN_IMAGE, with the build host's CA bundle: a base for docker/Dockerfile.cpu (built by docker/build-base.sh)"
COPY host-ca-bundle.crt /usr/local/share/ca-certificates/ditepose-build-host.crt
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && ln -s /usr/bin/python3 /usr/local/bin/python
ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
  build_from_dockerfile "$PYTHON_BASE" "Debian's python3 3.11 + venv on $DEBIAN_IMAGE" "$context"
  rm -rf "$context"
else
  say "$PYTHON_BASE: present"
fi

# ---------------------------------------------------------------- the compose stack's other images
standin() {  # image, Dockerfile, what
  local image=$1 dockerfile=$2 what=$3 labels
  if [ "$force" = 0 ] && have "$image"; then
    labels=$(docker image inspect -f '{{index .Config.Labels "io.ditepose.standin"}}' "$image" 2>/dev/null || true)
    if [ -n "$labels" ] && [ "$labels" != "<no value>" ]; then
      say "$image: present (LOCAL STAND-IN: $labels)"
    else
      say "$image: present (official)"
    fi
    return
  fi
  if [ "$force" = 0 ] && try_pull "$image"; then
    say "$image: pulled (official)"
    return
  fi
  say "$image: the official image cannot be pulled; building a LOCAL STAND-IN from $what under that name"
  build_from_dockerfile "$image" "$what" --build-arg "BASE_IMAGE=$DEBIAN_IMAGE" --build-arg "STANDIN_FOR=$image" \
    -f "$dockerfile" docker/standins
}
standin "$REDIS_IMAGE" docker/standins/Dockerfile.redis "Debian's redis-server 7.0"
standin "$PROMETHEUS_IMAGE" docker/standins/Dockerfile.prometheus "Debian's prometheus 2.42"
