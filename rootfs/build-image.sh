#!/usr/bin/env bash
# Builds a template base image, FILES_ROOT/images/NAME/rootfs.ext4, with the static wrenn binary
# as /usr/local/bin/wrenn (started as `wrenn envd` by the initramfs), the accounts root and user
# (1000:1000), and meta.json beside it. Skips the work when no input changed. Needs root (the
# tree's files must belong to root and to user).
#
# usage: rootfs/build-image.sh NAME [FILES_ROOT]
#   NAME                  a template under rootfs/templates/ (minimal, python)
#   FILES_ROOT            default $AGENT_FILES_ROOTDIR, else /var/lib/wrenn
#   WRENN_STATIC_BIN      the static wrenn binary (`just build-static` prints it)
#   WRENN_BUILD_DIR       intermediate trees and caches (default /var/tmp/wrenn-build)

STEP_NAME=image:${1:-?}
source "$(dirname "$0")/lib.sh"

NAME=${1:-}
FILES_ROOT=${2:-$FILES_ROOT}
TEMPLATE=$ROOTFS_DIR/templates/$NAME.sh
[[ $NAME =~ ^[a-z0-9][a-z0-9_-]*$ && -f $TEMPLATE ]] ||
    die "unknown template '$NAME'; known: $(cd "$ROOTFS_DIR/templates" && ls | sed 's/\.sh$//' | tr '\n' ' ')"
WRENN_BIN=${WRENN_STATIC_BIN:-}
[[ -n $WRENN_BIN && -x $WRENN_BIN ]] ||
    die "WRENN_STATIC_BIN must name the static wrenn binary (just build-static prints it)"
[[ $(id -u) == 0 ]] || die "image builds need root: the image's files belong to root and to user"
need_tools mkfs.ext4 debugfs dumpe2fs e2fsck python3 sha256sum

# The template defines template_inputs (printed strings and files that decide its contents) and
# populate_tree TREE (writes its userland into TREE).
source "$TEMPLATE"

image_dir=$FILES_ROOT/images/$NAME
image=$image_dir/rootfs.ext4
stamp=$image_dir/.stamp
mapfile -t inputs < <(template_inputs)
hash=$(inputs_hash "$0" "$ROOTFS_DIR/lib.sh" "$TEMPLATE" "$WRENN_BIN" "$SOURCE_DATE_EPOCH" "${inputs[@]}")
if up_to_date "$stamp" "$hash" "$image" "$image_dir/meta.json"; then
    log "up to date: $image"
    exit 0
fi
started=${EPOCHREALTIME/./}
log "building $image"

mkdir -p "$BUILD_DIR" "$image_dir"
work=$(mktemp -d "$BUILD_DIR/image-$NAME.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/tree
mkdir -m 0755 "$tree"
populate_tree "$tree"

log "installing wrenn ($("$WRENN_BIN" version | head -n1)) and the accounts"
install -D -m 0755 -o 0 -g 0 "$WRENN_BIN" "$tree/usr/local/bin/wrenn"
install_accounts "$tree"
install_guest_files "$tree"
clamp_mtimes "$tree"

log "making ext4 ($(du -sh --apparent-size "$tree" | cut -f1) in $(find "$tree" | wc -l) entries)"
make_ext4 "$tree" "$work/rootfs.ext4" "$NAME"
mv -f "$work/rootfs.ext4" "$image_dir/.rootfs.ext4.new"
mv -f "$image_dir/.rootfs.ext4.new" "$image"
write_meta "$image_dir/meta.json" "$NAME" "$WRENN_BIN" "$image" "$FILES_ROOT" \
    "$(elapsed_since "$started")" "$hash"
echo "$hash" >"$stamp"
log "done: $image ($(du -h --apparent-size "$image" | cut -f1))"
