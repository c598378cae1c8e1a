# The python template: the minimal template plus python3, pip and venv (pip may install into the
# system Python: the image drops EXTERNALLY-MANAGED, as a sandbox is the user's own machine).
# Sourced by build-image.sh.

source "$ROOTFS_DIR/templates/minimal.sh"
PYTHON_PACKAGES=$MINIMAL_PACKAGES,python3,python3-pip,python3-venv,python-is-python3

template_inputs() {
    echo "$ROOTFS_DIR/templates/minimal.sh"
    debian_inputs "$PYTHON_PACKAGES"
}

populate_tree() {
    debian_tree "$1" python "$PYTHON_PACKAGES"
}
