# The busybox template: a static busybox userland, enough for envd and shell commands; builds in
# seconds and boots fastest, for tests and for sandboxes that need nothing more. Sourced by
# build-image.sh.

BUSYBOX=/bin/busybox
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

template_inputs() {
    echo "$BUSYBOX"
    [[ -f $CA_BUNDLE ]] && echo "$CA_BUNDLE"
    return 0
}

populate_tree() {
    local tree=$1
    need_static_busybox "$BUSYBOX"
    log "installing busybox $("$BUSYBOX" | head -n1 | cut -d' ' -f2) and its applets"
    install -D -m 0755 "$BUSYBOX" "$tree/bin/busybox"
    # The initramfs starts envd, so busybox's own init must not be found as /sbin/init.
    "$BUSYBOX" --list-full | grep -v -x -E 'sbin/init|linuxrc|bin/busybox' | sort |
        python3 -c '
import os, sys
tree = sys.argv[1]
for applet in sys.stdin.read().split():
    os.makedirs(os.path.join(tree, os.path.dirname(applet)), exist_ok=True)
    os.symlink("/bin/busybox", os.path.join(tree, applet))
' "$tree"
    mkdir -p "$tree/etc"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$tree/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$tree/etc/group"
    printf 'root:*:%d:0:99999:7:::\nnobody:*:%d:0:99999:7:::\n' \
        $((SOURCE_DATE_EPOCH / 86400)) $((SOURCE_DATE_EPOCH / 86400)) >"$tree/etc/shadow"
    printf 'NAME="Wrenn busybox"\nID=wrenn-busybox\nPRETTY_NAME="Wrenn busybox"\n' \
        >"$tree/etc/os-release"
    if [[ -f $CA_BUNDLE ]]; then
        install -D -m 0644 "$CA_BUNDLE" "$tree$CA_BUNDLE"
    fi
}
