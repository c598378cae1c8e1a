# Wrenn developer recipes. Run `.ci/bootstrap` once on a fresh machine (the README's commands do).

set shell := ["bash", "-euo", "pipefail", "-c"]

# Build output lives outside the clone so repeated CI runs and clean clones reuse it.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", "/var/tmp/wrenn-target")
export WRENN_GIT_COMMIT := `git rev-parse --short HEAD 2>/dev/null || echo unknown`

musl := "x86_64-unknown-linux-musl"

default:
    @just --list

# Debug build of the wrenn binary.
build:
    cargo build

# Release build of the wrenn binary.
build-release:
    cargo build --release

# Static release build for guests: musl when available, else glibc with +crt-static.
# Prints the path of the binary on its last line.
build-static:
    #!/usr/bin/env bash
    set -euo pipefail
    if rustup target list --installed | grep -qx {{musl}} && command -v musl-gcc >/dev/null; then
      CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --target {{musl}} >&2
      echo "$CARGO_TARGET_DIR/{{musl}}/release/wrenn"
    else
      host=$(rustc -vV | sed -n 's/^host: //p')
      RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$host" >&2
      echo "$CARGO_TARGET_DIR/$host/release/wrenn"
    fi

# Format the tree.
fmt:
    cargo fmt

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo clippy --all-targets --features failpoints -- -D warnings

# The whole suite: lints, the static guest binary, then every test.
test: lint
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" cargo test --all-targets --features failpoints -- --test-threads=4

# Guest kernels and images go to the files root (rootfs/, docs/images.md); each recipe takes
# another root as its last argument.
files_root := env_var_or_default("AGENT_FILES_ROOTDIR", "/var/lib/wrenn")

# QEMU guest kernel (Debian cloud kernel as vmlinux) and the Wrenn initramfs into ROOT/kernels.
kernel root=files_root:
    rootfs/build-kernel.sh {{root}}

# Firecracker guest kernel from linux-source-6.1 (long; not run in CI).
kernel-firecracker root=files_root:
    rootfs/kernel/build-firecracker-kernel.sh {{root}}

# A template base image, ROOT/images/NAME/rootfs.ext4 (minimal, python), with the current envd.
image name root=files_root:
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" rootfs/build-image.sh {{name}} {{root}}

image-minimal root=files_root: (image "minimal" root)

image-python root=files_root: (image "python" root)

# Kernel and every image; each step is skipped when its inputs are unchanged.
images root=files_root: (kernel root) (image-minimal root) (image-python root)

# Replace envd inside an existing image (a name under ROOT/images, or an .ext4 path).
update-envd image root=files_root:
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" rootfs/update-envd.sh {{image}} {{root}}

# Image sizes, cold and up-to-date build times, boot-to-ready time under TCG.
bench-images:
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" cargo bench --bench images

# Regenerate `.sqlx/` (the data checked queries compile against) from the database at
# $DATABASE_URL, which must have every migration applied (`wrenn migrate up`).
sqlx-prepare:
    rm -rf .sqlx && mkdir .sqlx
    touch src/lib.rs
    SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" cargo build
