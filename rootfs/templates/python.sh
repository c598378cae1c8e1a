# The python template: Debian bookworm (minbase) with bash, coreutils, procps, python3, pip, git,
# curl and CA certificates, for real code execution. The Debian tree comes from mmdebstrap and is
# cached as a tarball keyed by its inputs, so a new envd only repeats the quick image step.
# Sourced by build-image.sh.

SUITE=bookworm
MIRROR=${WRENN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${WRENN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=bash,coreutils,procps,python3,python3-pip,python3-venv,python-is-python3,git,curl,ca-certificates,less

base_inputs() {
    echo "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$PACKAGES"
}

template_inputs() {
    base_inputs
}

base_tarball() {
    echo "$BUILD_DIR/python-base-$(inputs_hash "$TEMPLATE" "$SOURCE_DATE_EPOCH" "$(base_inputs)").tar"
}

build_base_tarball() {
    local out=$1
    need_tools mmdebstrap
    log "mmdebstrap $SUITE minbase + $PACKAGES (downloads ~100 MB, takes minutes)"
    # Documentation, manuals and translations are a third of the tree and unused in a sandbox.
    mmdebstrap --variant=minbase --include="$PACKAGES" --format=tar \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --aptopt='Acquire::Retries "3"' \
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*' \
        "$SUITE" "$out.part" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main" >&2 ||
        die "mmdebstrap failed (is $MIRROR reachable?)"
    mv -f "$out.part" "$out"
}

populate_tree() {
    local tree=$1 tarball
    tarball=$(base_tarball)
    if [[ -f $tarball ]]; then
        log "reusing the Debian tree $(basename "$tarball")"
    else
        mkdir -p "$BUILD_DIR"
        # Keep one cached tree: older ones belong to inputs that no longer exist.
        rm -f "$BUILD_DIR"/python-base-*.tar "$BUILD_DIR"/python-base-*.tar.part
        build_base_tarball "$tarball"
    fi
    log "unpacking the Debian tree"
    tar -x --numeric-owner -p --xattrs --xattrs-include='*' -f "$tarball" -C "$tree"
}
