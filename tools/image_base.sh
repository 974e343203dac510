#!/usr/bin/env bash
# Make the Dockerfile's base image, debian:bookworm-slim, from Debian's own packages, for a
# machine that has buildah but cannot pull from a container registry (CI here).
#
#   tools/image_base.sh [TAG]        (default docker.io/library/debian:bookworm-slim)
#
# debootstrap --variant=minbase of bookworm from the Debian mirror this machine's apt uses, with
# the slim image's dpkg excludes (no docs, man pages or locales) and apt settings, imported into
# buildah's store under the tag the Dockerfile names. An image already stored under that tag (a
# real pull, or an earlier run of this script) is kept: it is made once per machine.
# Runs as root (debootstrap and `buildah mount` need it); `make image` calls it.
set -euo pipefail

TAG="${1:-docker.io/library/debian:bookworm-slim}"
SUITE=bookworm

if buildah inspect --type image "$TAG" >/dev/null 2>&1; then
    echo "base image: $TAG is in buildah's store"
    exit 0
fi

# The mirror: the first Debian URI of this machine's apt sources (deb822 or one-line format).
sources() { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; }
MIRROR="${DEBIAN_MIRROR:-$(sources | grep -v '^\s*#' | grep -oE '(https?|file)://[^ ]+/debian/?( |$)' | grep -v security | head -1 | tr -d ' ' || true)}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-$(sources | grep -v '^\s*#' | grep -oE '(https?|file)://[^ ]+/debian-security/?( |$)' | head -1 | tr -d ' ' || true)}"
if [[ -z "$MIRROR" ]]; then
    echo "no Debian mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR (and DEBIAN_SECURITY_MIRROR)" >&2
    exit 1
fi

work="$(mktemp -d /var/tmp/sam2-base.XXXXXX)"
ctr=""
cleanup() {
    [[ -n "$ctr" ]] && buildah rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

root="$work/rootfs"
echo "base image: debootstrap $SUITE from $MIRROR (a few minutes)"
start=$SECONDS
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2
    exit 1
}

# What Debian's slim image adds: docs, man pages and locales are not installed, apt keeps no
# package files, and the sources are the suite, its updates and its security updates.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
rm -f "$root/etc/apt/sources.list"
{
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$MIRROR" "$SUITE" "$SUITE"
    if [[ -n "$SECURITY" ]]; then
        printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$SECURITY" "$SUITE"
    fi
} >"$root/etc/apt/sources.list.d/debian.sources"
rm -rf "$root"/usr/share/doc/*/[!c]* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"

ctr="$(buildah from --quiet scratch)"
mnt="$(buildah mount "$ctr")"
tar -C "$root" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
buildah umount "$ctr" >/dev/null
buildah config --cmd '["bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "org.opencontainers.image.description=debian $SUITE minbase, made by tools/image_base.sh" "$ctr"
buildah commit --quiet --rm "$ctr" "$TAG" >/dev/null
ctr=""
echo "base image: $TAG made in $((SECONDS - start)) s ($(du -sh "$root" | cut -f1) unpacked)"
