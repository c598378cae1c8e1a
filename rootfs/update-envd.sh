#!/usr/bin/env bash
# Replaces /usr/local/bin/wrenn (envd) inside an existing image without rebuilding it, with
# debugfs (no mount needed). The edit happens on a copy that is renamed over the image, so
# sandboxes already running from the old image keep reading the old, unchanged file.
#
# usage: rootfs/update-envd.sh NAME|IMAGE.ext4 [FILES_ROOT]
#   NAME                  an image under FILES_ROOT/images (its rootfs.ext4 and meta.json)
#   WRENN_STATIC_BIN      the static wrenn binary (`just build-static` prints it)

STEP_NAME=update-envd
source "$(dirname "$0")/lib.sh"

TARGET=${1:-}
FILES_ROOT=${2:-$FILES_ROOT}
WRENN_BIN=${WRENN_STATIC_BIN:-}
[[ -n $TARGET ]] || die "usage: update-envd.sh NAME|IMAGE.ext4 [FILES_ROOT]"
[[ -n $WRENN_BIN && -x $WRENN_BIN ]] ||
    die "WRENN_STATIC_BIN must name the static wrenn binary (just build-static prints it)"
need_tools debugfs dumpe2fs e2fsck resize2fs python3

if [[ $TARGET == */* || $TARGET == *.ext4 ]]; then
    image=$TARGET
else
    image=$FILES_ROOT/images/$TARGET/rootfs.ext4
fi
[[ -f $image ]] || die "no image at $image"
e2fsck -fn "$image" >/dev/null 2>&1 || die "$image is not a clean ext4 file system"

new=$(dirname "$image")/.$(basename "$image").update
trap 'rm -f "$new" "$new.cmds" "$new.err"' EXIT
cp --sparse=always "$image" "$new"

# Grow the copy when the new binary would not fit in the free space plus the old binary.
block_size=$(dumpe2fs -h "$new" 2>/dev/null | awk '/^Block size:/ { print $3 }')
free_blocks=$(dumpe2fs -h "$new" 2>/dev/null | awk '/^Free blocks:/ { print $3 }')
needed_blocks=$(($(stat -c %s "$WRENN_BIN") / block_size + 64))
if ((free_blocks < needed_blocks)); then
    grow_kib=$((needed_blocks * block_size / 1024 + 8192))
    log "growing the image by $grow_kib KiB to fit the new binary"
    truncate -s "+${grow_kib}K" "$new"
    resize2fs "$new" >/dev/null 2>&1 || die "resize2fs could not grow $new"
fi

cat >"$new.cmds" <<EOF
rm /usr/local/bin/wrenn
cd /usr/local/bin
write $WRENN_BIN wrenn
sif /usr/local/bin/wrenn mode 0100755
sif /usr/local/bin/wrenn uid 0
sif /usr/local/bin/wrenn gid 0
sif /usr/local/bin/wrenn mtime @$SOURCE_DATE_EPOCH
sif /usr/local/bin/wrenn ctime @$SOURCE_DATE_EPOCH
sif /usr/local/bin/wrenn atime @$SOURCE_DATE_EPOCH
sif /usr/local/bin/wrenn crtime @$SOURCE_DATE_EPOCH
EOF
log "writing $("$WRENN_BIN" version | head -n1) into $image"
debugfs -w -f "$new.cmds" "$new" >/dev/null 2>"$new.err" || die "debugfs failed: $(cat "$new.err")"
if grep -v '^debugfs ' "$new.err" | grep -q .; then
    die "debugfs reported: $(grep -v '^debugfs ' "$new.err" | head -n3)"
fi
rm -f "$new.err"
e2fsck -fn "$new" >/dev/null 2>&1 || die "the updated copy of $image fails e2fsck; image left unchanged"
debugfs -R 'dump /usr/local/bin/wrenn /dev/stdout' "$new" 2>/dev/null | cmp -s - "$WRENN_BIN" ||
    die "the binary read back from the updated image differs from $WRENN_BIN"
mv -f "$new" "$image"

meta=$(dirname "$image")/meta.json
if [[ -f $meta ]]; then
    python3 - "$meta" "$("$WRENN_BIN" version | head -n1)" "$(stat -c %s "$image")" \
        "$(sha256sum "$image" | cut -d' ' -f1)" <<'PY'
import datetime, json, os, sys
meta, envd, size, sha = sys.argv[1:]
with open(meta) as f:
    doc = json.load(f)
doc.update(
    envd_version=envd,
    envd_updated_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    size_bytes=int(size),
    sha256=sha,
)
with open(meta + ".new", "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.replace(meta + ".new", meta)
PY
fi
log "done: $image now carries $("$WRENN_BIN" version | head -n1)"
