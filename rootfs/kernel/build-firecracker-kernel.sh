#!/usr/bin/env bash
# Builds the Firecracker guest kernel from Debian's linux-source-6.1 with firecracker.config
# merged onto x86_64_defconfig, and installs it as FILES_ROOT/kernels/vmlinux-firecracker.
# Not part of CI: it compiles a kernel (about an hour on two cores). Needs the packages
# linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev (apt-get install them).
#
# usage: rootfs/kernel/build-firecracker-kernel.sh [FILES_ROOT]
#   WRENN_BUILD_DIR   where the source is unpacked and built (default /var/tmp/wrenn-build)
#   JOBS              parallel compile jobs (default: number of CPUs)

STEP_NAME=firecracker-kernel
source "$(dirname "$0")/../lib.sh"

FILES_ROOT=${1:-$FILES_ROOT}
FRAGMENT=$ROOTFS_DIR/kernel/firecracker.config
need_tools make gcc bc bison flex

source_tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null) ||
    die "/usr/src/linux-source-6.1.tar.xz missing; apt-get install linux-source-6.1"
out=$FILES_ROOT/kernels/vmlinux-firecracker
stamp=$FILES_ROOT/kernels/.stamp-firecracker
hash=$(inputs_hash "$0" "$FRAGMENT" "$source_tarball" "$(dpkg-query -W -f='${Version}' linux-source-6.1)")
if up_to_date "$stamp" "$hash" "$out"; then
    log "up to date: $out"
    exit 0
fi

src=$BUILD_DIR/linux-source-6.1
if [[ ! -d $src ]]; then
    log "unpacking $source_tarball"
    mkdir -p "$BUILD_DIR"
    tar -xf "$source_tarball" -C "$BUILD_DIR"
fi
export KBUILD_BUILD_TIMESTAMP="@$SOURCE_DATE_EPOCH" KBUILD_BUILD_USER=wrenn KBUILD_BUILD_HOST=wrenn
log "configuring: x86_64_defconfig + $(basename "$FRAGMENT")"
make -C "$src" -s x86_64_defconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$FRAGMENT" >/dev/null
make -C "$src" -s olddefconfig
# merge_config warns but continues when an option's dependencies are unmet; refuse instead.
missing=$(grep -E '^CONFIG_[A-Z0-9_]+=y' "$FRAGMENT" | while read -r line; do
    grep -qx "$line" "$src/.config" || echo "${line%%=*}"
done)
[[ -z $missing ]] || die "options the kernel config dropped: $missing"
log "compiling vmlinux with ${JOBS:=$(nproc)} jobs"
make -C "$src" -s -j"$JOBS" vmlinux
mkdir -p "$(dirname "$out")"
cp "$src/vmlinux" "$out.new"
mv -f "$out.new" "$out"
echo "$hash" >"$stamp"
log "done: $out ($(du -h "$out" | cut -f1), $(make -C "$src" -s kernelrelease))"
