# The code-runner-beta template: the python template plus a Jupyter server on port 8888, started
# at boot as `user` by envd (/etc/wrenn/template.json), with a Python kernelspec named `wrenn`:
# what the SDK's code_runner expects. The server takes no token: it is reached only through the
# control plane's authenticated port proxy. Sourced by build-image.sh.

source "$ROOTFS_DIR/templates/python.sh"
# Pinned, so the image changes only when this line does (their dependencies come as PyPI
# resolves them then).
JUPYTER_PACKAGES="jupyter_server==2.14.2 ipykernel==6.29.5"

template_inputs() {
    echo "$ROOTFS_DIR/templates/minimal.sh"
    echo "$ROOTFS_DIR/templates/python.sh"
    debian_inputs "$PYTHON_PACKAGES"
    echo "$JUPYTER_PACKAGES"
}

# Wheels for the guest's Python (CPython 3.11, x86_64), downloaded once per JUPYTER_PACKAGES with
# the host's pip and its certificate settings, then installed without network.
jupyter_wheels() {
    local dir
    dir=$BUILD_DIR/jupyter-wheels-$(inputs_hash "$JUPYTER_PACKAGES")
    if [[ ! -d $dir ]]; then
        [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -m pip --version >/dev/null 2>&1 ||
            die "/usr/bin/python3 -m pip not found; run .ci/bootstrap"
        log "downloading $JUPYTER_PACKAGES and their dependencies from PyPI"
        rm -rf "$dir.part"
        # shellcheck disable=SC2086 # the package list is words on purpose
        /usr/bin/python3 -m pip download --quiet --disable-pip-version-check \
            --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 -d "$dir.part" $JUPYTER_PACKAGES >&2 ||
            die "downloading the Jupyter wheels failed (is PyPI reachable?)"
        mv "$dir.part" "$dir"
    fi
    echo "$dir"
}

populate_tree() {
    local tree=$1 wheels
    debian_tree "$tree" python "$PYTHON_PACKAGES"
    wheels=$(jupyter_wheels)
    log "installing $JUPYTER_PACKAGES into /usr/local"
    # The host's Python is the guest's (Debian bookworm's 3.11), so its pip installs for it, into
    # Debian's /usr/local scheme under the tree; only from the downloaded wheels, whatever the
    # host's pip settings add, and whatever the host itself has installed.
    # shellcheck disable=SC2086
    env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        /usr/bin/python3 -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --no-index --find-links "$wheels" --root "$tree" \
        --ignore-installed --no-warn-script-location $JUPYTER_PACKAGES >&2 ||
        die "installing the Jupyter wheels into the tree failed"
    install -d "$tree/usr/local/share/jupyter/kernels/wrenn"
    cat >"$tree/usr/local/share/jupyter/kernels/wrenn/kernel.json" <<'JSON'
{
  "argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
  "display_name": "Python 3 (Wrenn)",
  "language": "python",
  "metadata": {"debugger": true}
}
JSON
    install -d "$tree/etc/wrenn"
    cat >"$tree/etc/wrenn/template.json" <<'JSON'
{
  "start": [
    {
      "tag": "jupyter",
      "process": {
        "cmd": "/usr/local/bin/jupyter",
        "args": [
          "server", "--ip=0.0.0.0", "--port=8888", "--no-browser",
          "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.allow_origin=*",
          "--ServerApp.disable_check_xsrf=True", "--ServerApp.root_dir=/home/user"
        ],
        "cwd": "/home/user",
        "user": "user"
      }
    }
  ]
}
JSON
}
