# Shared by the rootfs/ build scripts: settings, progress lines, input stamps and reproducible ext4.
# Sourced, not executed.

set -euo pipefail

ROOTFS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The files root the agent reads (config key agent.files_rootdir), overridable per call.
FILES_ROOT=${AGENT_FILES_ROOTDIR:-/var/lib/wrenn}
# Downloads and intermediate trees; kept between runs so rebuilds skip what they can.
BUILD_DIR=${WRENN_BUILD_DIR:-/var/tmp/wrenn-build}
# Every timestamp written into a kernel archive or image; fixed so identical inputs give
# identical bytes.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}
# libext2fs takes the mkfs and superblock times from here.
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
export LC_ALL=C TZ=UTC

STEP_STARTED_US=${EPOCHREALTIME/./}

# Seconds, with one decimal, since a ${EPOCHREALTIME/./} reading.
elapsed_since() {
    local us=$((${EPOCHREALTIME/./} - $1))
    printf '%d.%d' $((us / 1000000)) $((us / 100000 % 10))
}

# One progress line on stderr: the step, seconds since the script started, the message.
log() {
    printf '[%s %5ss] %s\n' "$STEP_NAME" "$(elapsed_since "$STEP_STARTED_US")" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

need_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool not found; run .ci/bootstrap"
    done
}

# Guests have no shared libraries outside the python image: refuse a dynamic busybox.
need_static_busybox() {
    need_tools readelf
    if [[ ! -x $1 ]] || readelf -l "$1" 2>/dev/null | grep -q INTERP; then
        die "$1 is missing or not static; install busybox-static"
    fi
}

# sha256 of the named files' contents and the given strings, in argument order.
inputs_hash() {
    local item
    for item in "$@"; do
        if [[ -f $item ]]; then
            printf 'file %s\n' "$(basename "$item")"
            cat "$item"
        else
            printf 'value %s\n' "$item"
        fi
    done | sha256sum | cut -d' ' -f1
}

# True when STAMP records HASH and every output exists.
up_to_date() {
    local stamp=$1 hash=$2
    shift 2
    [[ -f $stamp && $(cat "$stamp") == "$hash" ]] || return 1
    local out
    for out in "$@"; do
        [[ -e $out ]] || return 1
    done
}

# A stable UUID derived from a name, so an image's identity does not change between builds.
name_uuid() {
    local h
    h=$(printf 'wrenn:%s' "$1" | sha256sum | cut -c1-32)
    printf '%s-%s-4%s-8%s-%s\n' "${h:0:8}" "${h:8:4}" "${h:13:3}" "${h:17:3}" "${h:20:12}"
}

# Every in-use inode of an ext4 image (the root and the ordinary ones), from its inode bitmaps.
used_inodes() {
    dumpe2fs "$1" 2>/dev/null | awk '
        /^Inodes per group:/ { ipg = $4 }
        /^Group [0-9]+:/ { group = $2 + 0 }
        /^  Free inodes:/ {
            sub(/^  Free inodes: */, "")
            n = split($0, ranges, /, */)
            next_ino = group * ipg + 1
            last = (group + 1) * ipg
            for (i = 1; i <= n + 1; i++) {
                if (i <= n && ranges[i] != "") {
                    split(ranges[i], bounds, "-")
                    lo = bounds[1] + 0
                    hi = (bounds[2] == "" ? lo : bounds[2] + 0)
                } else if (i == n + 1) {
                    lo = last + 1; hi = last
                } else {
                    continue
                }
                for (ino = next_ino; ino < lo; ino++)
                    if (ino == 2 || ino >= 11) print ino
                next_ino = hi + 1
            }
        }'
}

# Builds an ext4 image of TREE at OUT, sized to its contents. mkfs copies each file's ctime and
# atime from the build tree, which no one can set, so they are rewritten afterwards to
# SOURCE_DATE_EPOCH; UUID and directory hash seed come from NAME.
make_ext4() {
    local tree=$1 out=$2 name=$3
    local used_kib files size_kib uuid
    # Blocks in use (4 KiB rounding included, as on ext4), a tenth for directories and extent
    # trees, and room for the journal; the image is a read-only lower layer, so free space is
    # only needed for update-envd, which grows the image when it must.
    used_kib=$(du -sk "$tree" | cut -f1)
    files=$(find "$tree" | wc -l)
    size_kib=$((used_kib * 11 / 10 + files / 4 + 24576))
    uuid=$(name_uuid "image:$name")
    rm -f "$out"
    mkfs.ext4 -q -F -t ext4 -b 4096 -I 256 -m 0 -N $((files + files / 5 + 256)) \
        -L "$(printf '%.16s' "wrenn-$name")" -U "$uuid" -E "hash_seed=$uuid,root_owner=0:0,lazy_itable_init=0" \
        -d "$tree" "$out" "${size_kib}K" >/dev/null ||
        die "mkfs.ext4 could not build $out from $tree"
    used_inodes "$out" | awk -v t="@$SOURCE_DATE_EPOCH" '
        { printf "sif <%d> ctime %s\nsif <%d> atime %s\n", $1, t, $1, t }' >"$out.times"
    debugfs -w -f "$out.times" "$out" >/dev/null 2>"$out.times.err" ||
        die "debugfs could not normalise timestamps in $out: $(cat "$out.times.err")"
    if grep -v '^debugfs ' "$out.times.err" | grep -q .; then
        die "debugfs reported errors normalising $out: $(head -n3 "$out.times.err")"
    fi
    rm -f "$out.times" "$out.times.err"
    e2fsck -fn "$out" >/dev/null 2>&1 || die "e2fsck found errors in the new image $out"
}

# Writes TREE's entries with every timestamp at SOURCE_DATE_EPOCH (symlinks included).
clamp_mtimes() {
    find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

# Adds root and the default user (user, 1000:1000, /home/user) to TREE's account files where
# missing; both are locked for password logins (envd starts processes as them directly).
install_accounts() {
    local tree=$1 shell=/bin/sh days=$((SOURCE_DATE_EPOCH / 86400))
    [[ -x $tree/bin/bash ]] && shell=/bin/bash
    mkdir -p "$tree/etc"
    touch "$tree/etc/passwd" "$tree/etc/group" "$tree/etc/shadow"
    grep -q '^root:' "$tree/etc/passwd" || echo "root:x:0:0:root:/root:$shell" >>"$tree/etc/passwd"
    grep -q '^user:' "$tree/etc/passwd" ||
        echo "user:x:1000:1000:Wrenn sandbox user:/home/user:$shell" >>"$tree/etc/passwd"
    grep -q '^root:' "$tree/etc/group" || echo "root:x:0:" >>"$tree/etc/group"
    grep -q '^user:' "$tree/etc/group" || echo "user:x:1000:" >>"$tree/etc/group"
    grep -q '^root:' "$tree/etc/shadow" || echo "root:*:$days:0:99999:7:::" >>"$tree/etc/shadow"
    grep -q '^user:' "$tree/etc/shadow" || echo "user:*:$days:0:99999:7:::" >>"$tree/etc/shadow"
    chmod 0644 "$tree/etc/passwd" "$tree/etc/group"
    chmod 0640 "$tree/etc/shadow"
    install -d -m 0700 -o 0 -g 0 "$tree/root"
    install -d -m 0755 -o 1000 -g 1000 "$tree/home/user"
    # The sandbox is the user's own machine: where sudo is installed, `user` may use it without
    # a password (it has none).
    if [[ -x $tree/usr/bin/sudo ]]; then
        install -d -m 0750 "$tree/etc/sudoers.d"
        echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' >"$tree/etc/sudoers.d/wrenn-user"
        chmod 0440 "$tree/etc/sudoers.d/wrenn-user"
    fi
}

# What envd expects in every image: mount points, sticky temp directories, and the files it
# rewrites at boot (hostname, hosts, resolv.conf) present as placeholders.
install_guest_files() {
    local tree=$1 dir
    for dir in dev proc sys run; do
        install -d -m 0755 "$tree/$dir"
    done
    install -d -m 1777 "$tree/tmp" "$tree/var/tmp"
    install -d -m 0755 "$tree/usr/local/bin"
    echo capsule >"$tree/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tcapsule\n' \
        >"$tree/etc/hosts"
    rm -f "$tree/etc/resolv.conf"
    echo '# Written by envd at boot from the sandbox network settings.' >"$tree/etc/resolv.conf"
}

# meta.json beside an image: what it is, which envd it carries, when and how fast it was built,
# and the kernel installed in the same files root (the one tests boot it with).
write_meta() {
    local meta=$1 name=$2 bin=$3 image=$4 files_root=$5 seconds=$6 inputs=$7
    python3 - "$meta" "$name" "$("$bin" version | head -n1)" "$(stat -c %s "$image")" \
        "$(sha256sum "$image" | cut -d' ' -f1)" "$files_root/kernels/kernel.json" "$seconds" \
        "$inputs" <<'PY'
import datetime, json, os, sys
meta, name, envd, size, sha, kernel_json, seconds, inputs = sys.argv[1:]
kernel = None
if os.path.exists(kernel_json):
    with open(kernel_json) as f:
        kernel = json.load(f).get("release")
doc = {
    "template": name,
    "envd_version": envd,
    "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "build_seconds": float(seconds),
    "size_bytes": int(size),
    "sha256": sha,
    "kernel": kernel,
    "inputs_sha256": inputs,
}
with open(meta + ".new", "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.replace(meta + ".new", meta)
PY
}

# ---- Debian templates ------------------------------------------------------------------------

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${WRENN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${WRENN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Downloaded packages, shared by every Debian template's build so the second one fetches only
# what the first did not.
DEBIAN_PACKAGE_CACHE=$BUILD_DIR/apt-archives

# What decides a Debian tree: the suite, the mirrors and the packages (comma-separated).
debian_inputs() {
    echo "$DEBIAN_SUITE" "$DEBIAN_MIRROR" "$DEBIAN_SECURITY_MIRROR" "$1"
}

# Unpacks into TREE a Debian minbase tree with PACKAGES (comma-separated), from a tarball cached
# under BUILD_DIR and keyed by its inputs; a new envd or a change outside the Debian tree repeats
# only the quick image step. KIND names the cache (one tarball per kind is kept).
debian_tree() {
    local tree=$1 kind=$2 packages=$3 tarball
    tarball=$BUILD_DIR/$kind-base-$(inputs_hash "$SOURCE_DATE_EPOCH" "$(debian_inputs "$packages")").tar
    if [[ -f $tarball ]]; then
        log "reusing the Debian tree $(basename "$tarball")"
    else
        need_tools mmdebstrap
        mkdir -p "$BUILD_DIR" "$DEBIAN_PACKAGE_CACHE"
        rm -f "$BUILD_DIR/$kind"-base-*.tar "$BUILD_DIR/$kind"-base-*.tar.part
        log "mmdebstrap $DEBIAN_SUITE minbase + $packages (downloads what the package cache lacks)"
        # Documentation, manuals and translations are a third of the tree and unused in a
        # sandbox; apt's lists are dropped as in container images (`apt-get update` first).
        mmdebstrap --variant=minbase --include="$packages" --format=tar \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --dpkgopt='path-include=/usr/share/locale/locale.alias' \
            --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --aptopt='Acquire::Retries "3"' \
            --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
            --setup-hook="sync-in $DEBIAN_PACKAGE_CACHE /var/cache/apt/archives/" \
            --customize-hook="sync-out /var/cache/apt/archives $DEBIAN_PACKAGE_CACHE" \
            --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*' \
            "$DEBIAN_SUITE" "$tarball.part" \
            "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
            "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
            "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main" >&2 ||
            die "mmdebstrap failed (is $DEBIAN_MIRROR reachable?)"
        mv -f "$tarball.part" "$tarball"
    fi
    log "unpacking the Debian tree"
    tar -x --numeric-owner -p --xattrs --xattrs-include='*' -f "$tarball" -C "$tree"
}
