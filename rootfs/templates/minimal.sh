# The minimal template, the default: Debian bookworm (minbase) with bash and the everyday tools a
# user or an SDK expects (git, curl, ps, ip, tar/gzip/xz, less, sudo). The unprivileged `user`
# may sudo without a password. Sourced by build-image.sh (and by python.sh, which extends it).

MINIMAL_PACKAGES=bash,coreutils,git,curl,ca-certificates,procps,iproute2,tar,gzip,xz-utils,less,sudo

template_inputs() {
    debian_inputs "$MINIMAL_PACKAGES"
}

populate_tree() {
    debian_tree "$1" minimal "$MINIMAL_PACKAGES"
}
