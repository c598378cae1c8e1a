#!/usr/bin/env bash
# Installs the QEMU guest kernel into FILES_ROOT/kernels: Debian's cloud kernel as an uncompressed
# vmlinux, an initramfs holding its virtio, overlayfs and vsock modules plus the Wrenn /init, and
# kernel.json describing both. Needs no root. Skips the work when nothing changed.
#
# usage: rootfs/build-kernel.sh [FILES_ROOT]
#   FILES_ROOT            default $AGENT_FILES_ROOTDIR, else /var/lib/wrenn
#   WRENN_KERNEL_PACKAGE  apt package to take the kernel from (default linux-image-cloud-amd64;
#                         a versioned name such as linux-image-6.1.0-56-cloud-amd64 pins it)
#   WRENN_BUILD_DIR       download cache (default /var/tmp/wrenn-build)

STEP_NAME=kernel
source "$(dirname "$0")/lib.sh"

FILES_ROOT=${1:-$FILES_ROOT}
KERNEL_PACKAGE=${WRENN_KERNEL_PACKAGE:-linux-image-cloud-amd64}
# Module names as modprobe knows them; their dependencies are added from modules.dep.
MODULES=(virtio_mmio virtio_blk virtio_net overlay vmw_vsock_virtio_transport)
BUSYBOX=/bin/busybox

need_tools apt-cache apt-get dpkg-deb depmod modprobe cpio gzip lz4 zstd xz sha256sum
need_static_busybox "$BUSYBOX"

# Prints "PACKAGE VERSION" of the kernel image package; a metapackage names it in its Depends.
resolve_package() {
    local record depends version
    record=$(apt-cache show --no-all-versions "$1" 2>/dev/null) ||
        die "apt knows no package $1; run apt-get update or set WRENN_KERNEL_PACKAGE"
    depends=$(sed -n 's/^Depends: //p' <<<"$record")
    version=$(sed -n 's/^Version: //p' <<<"$record")
    if [[ $depends =~ ^(linux-image-[0-9][^ ,]*)\ \(=\ ([^\)]+)\) ]]; then
        echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
    else
        echo "$1 $version"
    fi
}

# extract-vmlinux: find each compressed payload's magic in the bzImage and keep the first one
# that decompresses to an ELF file.
extract_vmlinux() {
    local bzimage=$1 out=$2 magic tool offset
    for magic in '\x02\x21\x4c\x18:lz4 -dc' '\x28\xb5\x2f\xfd:zstd -dcq' '\xfd\x37\x7a\x58\x5a\x00:xz -dcq' \
        '\x1f\x8b\x08:gzip -dcq'; do
        tool=${magic#*:}
        for offset in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$bzimage" | cut -d: -f1); do
            # Decompressors complain about the bytes after the payload; the ELF check decides.
            tail -c "+$((offset + 1))" "$bzimage" | $tool >"$out" 2>/dev/null || true
            if [[ $(head -c4 "$out" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
                log "vmlinux payload: ${tool%% *} at offset $offset"
                return 0
            fi
        done
    done
    die "no compressed ELF payload found in $bzimage"
}

# Copies a module, decompressed (busybox insmod needs a plain .ko).
copy_module() {
    local src=$1 dest=$2
    case "$src" in
    *.ko.xz) xz -dc "$src" >"$dest" ;;
    *.ko.zst) zstd -dcq "$src" >"$dest" ;;
    *.ko.gz) gzip -dc "$src" >"$dest" ;;
    *.ko) cp "$src" "$dest" ;;
    *) die "unexpected module file $src" ;;
    esac
}

read -r image_package version < <(resolve_package "$KERNEL_PACKAGE") || exit 1
kernels_dir=$FILES_ROOT/kernels
stamp=$kernels_dir/.stamp
hash=$(inputs_hash "$0" "$ROOTFS_DIR/lib.sh" "$ROOTFS_DIR/initramfs/init" "$BUSYBOX" \
    "$image_package=$version" "${MODULES[*]}" "$SOURCE_DATE_EPOCH")
if up_to_date "$stamp" "$hash" "$kernels_dir/vmlinux" "$kernels_dir/initramfs.cpio.gz"; then
    log "up to date: $image_package $version in $kernels_dir"
    exit 0
fi
log "building from $image_package $version into $kernels_dir"

download_dir=$BUILD_DIR/debs
mkdir -p "$download_dir" "$kernels_dir"
deb=$(find "$download_dir" -maxdepth 1 -name "${image_package}_${version//:/%3a}_*.deb" | head -n1)
if [[ -z $deb ]]; then
    log "downloading $image_package=$version"
    (cd "$download_dir" && apt-get download -q -o APT::Sandbox::User="$(id -un)" \
        "$image_package=$version" >&2) || die "apt-get download $image_package=$version failed"
    deb=$(find "$download_dir" -maxdepth 1 -name "${image_package}_*.deb" | sort | tail -n1)
fi

work=$(mktemp -d "$BUILD_DIR/kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/pkg"
bzimage=$(find "$work/pkg/boot" -name 'vmlinuz-*' | head -n1)
[[ -n $bzimage ]] || die "$deb holds no /boot/vmlinuz-*"
release=${bzimage##*/vmlinuz-}

extract_vmlinux "$bzimage" "$work/vmlinux"

modules_root=$work/pkg/lib/modules/$release
[[ -f $modules_root/modules.dep ]] || depmod -b "$work/pkg" "$release"
tree=$work/initramfs
mkdir -p "$tree/bin" "$tree/lib/modules"
cp "$BUSYBOX" "$tree/bin/busybox"
install -m 0755 "$ROOTFS_DIR/initramfs/init" "$tree/init"
for module in "${MODULES[@]}"; do
    modprobe -d "$work/pkg" -S "$release" --show-depends "$module" ||
        die "module $module not found in $image_package"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$work/order"
while read -r path; do
    name=$(basename "$path")
    name=${name%.xz}
    name=${name%.zst}
    name=${name%.gz}
    copy_module "$path" "$tree/lib/modules/$name"
    echo "$name" >>"$tree/lib/modules/load-order"
done <"$work/order"
echo "$release" >"$tree/lib/modules/release"
log "initramfs modules: $(tr '\n' ' ' <"$tree/lib/modules/load-order")"

clamp_mtimes "$tree"
(cd "$tree" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
    gzip -9n >"$work/initramfs.cpio.gz"

cat >"$work/kernel.json" <<EOF
{
  "package": "$image_package",
  "package_version": "$version",
  "release": "$release",
  "vmlinux_sha256": "$(sha256sum "$work/vmlinux" | cut -d' ' -f1)",
  "initramfs_sha256": "$(sha256sum "$work/initramfs.cpio.gz" | cut -d' ' -f1)",
  "modules": [$(sed 's/.*/"&"/' "$tree/lib/modules/load-order" | paste -sd, -)]
}
EOF
# Renames keep a running agent from ever reading half a kernel.
for file in vmlinux initramfs.cpio.gz kernel.json; do
    cp "$work/$file" "$kernels_dir/.$file.new"
    mv -f "$kernels_dir/.$file.new" "$kernels_dir/$file"
done
echo "$hash" >"$stamp"
log "done: vmlinux $(du -h "$kernels_dir/vmlinux" | cut -f1), initramfs $(du -h "$kernels_dir/initramfs.cpio.gz" | cut -f1), release $release"
