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

# Format the tree (every workspace member).
fmt:
    cargo fmt --all

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --workspace --all-targets --features failpoints -- -D warnings

# The whole suite: lints, the static guest binary, then every test of every workspace member
# (the `wrenn` package and crates/test-support).
test: lint
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" cargo test --workspace --all-targets --features failpoints -- --test-threads=4

# Guest kernels and images go to the files root (rootfs/, docs/images.md); each recipe takes
# another root as its last argument.
files_root := env_var_or_default("AGENT_FILES_ROOTDIR", "/var/lib/wrenn")

# QEMU guest kernel (Debian cloud kernel as vmlinux) and the Wrenn initramfs into ROOT/kernels.
kernel root=files_root:
    rootfs/build-kernel.sh {{root}}

# Firecracker guest kernel from linux-source-6.1 (long; not run in CI).
kernel-firecracker root=files_root:
    rootfs/kernel/build-firecracker-kernel.sh {{root}}

# A template base image, ROOT/images/NAME/rootfs.ext4 (minimal, python, code-runner-beta,
# busybox), with the current envd.
image name root=files_root:
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" rootfs/build-image.sh {{name}} {{root}}

image-minimal root=files_root: (image "minimal" root)

image-busybox root=files_root: (image "busybox" root)

image-code-runner-beta root=files_root: (image "code-runner-beta" root)

image-python root=files_root: (image "python" root)

# Kernel and every image; each step is skipped when its inputs are unchanged.
images root=files_root: (kernel root) (image-minimal root) (image-python root) (image-code-runner-beta root) (image-busybox root)

# Replace envd inside an existing image (a name under ROOT/images, or an .ext4 path).
update-envd image root=files_root:
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" rootfs/update-envd.sh {{image}} {{root}}

# Image sizes, cold and up-to-date build times, boot-to-ready time under TCG.
bench-images:
    WRENN_STATIC_BIN="$(just build-static | tail -n1)" cargo bench --bench images

# Creates by cold boot vs by boot snapshot, snapshot templates, forks, snapshot sizes.
bench-snapshots:
    cargo bench --bench snapshots

# Template store throughput (directory and S3 backends): publish, pull, resumed pull.
bench-store:
    cargo bench --bench store

# Regenerate `.sqlx/` (the data checked queries compile against) from the database at
# $DATABASE_URL, which must have every migration applied (`wrenn migrate up`).
sqlx-prepare:
    rm -rf .sqlx && mkdir .sqlx
    touch src/lib.rs
    SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" cargo build

# The whole stack on this machine: a private PostgreSQL, the control plane, an agent registered
# with it, the kernel and `minimal` image, then a sandbox running `echo hello from a microVM`.
# Prints an API key and curl examples and keeps running until Ctrl-C, which cleans everything
# up. With WRENN_DEV_ONESHOT=1 it stops by itself after the sandbox ran.
dev: build build-static
    #!/usr/bin/env bash
    set -euo pipefail
    dev=${WRENN_DEV_DIR:-/var/tmp/wrenn-dev}
    bin=$CARGO_TARGET_DIR/debug/wrenn
    cp_port=${WRENN_DEV_CP_PORT:-8000}
    agent_port=${WRENN_DEV_AGENT_PORT:-50051}
    pg_port=${WRENN_DEV_PG_PORT:-55432}
    say() { printf '\033[1mwrenn dev:\033[0m %s\n' "$*" >&2; }
    json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
    pids=()
    cleanup() {
      say "stopping"
      for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
      for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
      setpriv --reuid=nobody --regid=nogroup --clear-groups pg_ctl -D "$dev/pg" -m fast stop >/dev/null 2>&1 || true
    }
    trap cleanup EXIT
    trap 'exit 0' INT TERM

    say "files root $dev/root: kernel and minimal image"
    mkdir -p "$dev/root"
    rootfs/build-kernel.sh "$dev/root" >&2
    static=$(just build-static | tail -n1)
    WRENN_STATIC_BIN=$static rootfs/build-image.sh minimal "$dev/root" >&2

    say "private PostgreSQL on 127.0.0.1:$pg_port"
    rm -rf "$dev/pg" && mkdir -p "$dev/pg" && chown nobody:nogroup "$dev/pg"
    as_pg() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
    as_pg initdb -D "$dev/pg" --auth=trust --username=wrenn --no-instructions >/dev/null
    as_pg pg_ctl -D "$dev/pg" -l "$dev/pg/postgres.log" -w \
      -o "-p $pg_port -k $dev/pg -c listen_addresses=127.0.0.1" start >/dev/null
    as_pg psql -h 127.0.0.1 -p "$pg_port" -U wrenn -d postgres -qc 'CREATE DATABASE wrenn'
    export DATABASE_URL="postgres://wrenn@127.0.0.1:$pg_port/wrenn"
    export JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    "$bin" migrate up >&2

    say "control plane on 127.0.0.1:$cp_port"
    password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$password" > "$dev/admin-password"
    "$bin" cp admin create --email admin@wrenn.local --password-file "$dev/admin-password" >&2
    # Agent and control plane share this machine: the agent registers a loopback address.
    CP_LISTEN_ADDR=127.0.0.1:$cp_port CP_ALLOW_LOOPBACK_HOSTS=true "$bin" cp serve 2>"$dev/cp.log" & pids+=($!)
    api=http://127.0.0.1:$cp_port
    for _ in $(seq 100); do curl -sf "$api/health" >/dev/null && break; sleep 0.1; done
    jwt=$(curl -sf "$api/v1/auth/login" -H 'content-type: application/json' \
      -d "{\"email\":\"admin@wrenn.local\",\"password\":\"$password\"}" | json "['token']")

    vmm=qemu
    if [ -x /usr/local/bin/firecracker ] && [ -w /dev/kvm ]; then vmm=firecracker; fi
    say "host agent on 127.0.0.1:$agent_port with the $vmm VMM"
    token=$(curl -sf "$api/v1/hosts" -H "authorization: Bearer $jwt" -H 'content-type: application/json' \
      -d '{"type":"regular"}' | json "['registration_token']")
    rm -rf "$dev/root/host-token" "$dev/root/sandboxes"
    # The dev stack owns its sandboxes: stopping it removes them.
    # The token from the environment: a command line is visible to every local user.
    AGENT_FILES_ROOTDIR=$dev/root AGENT_CP_URL=$api AGENT_LISTEN_ADDR=127.0.0.1:$agent_port AGENT_DESTROY_SANDBOXES_ON_STOP=true \
      AGENT_ENVD_BINARY=$static WRENN_REGISTER_TOKEN=$token AGENT_VMM=$vmm "$bin" agent --address "127.0.0.1:$agent_port" \
      2>"$dev/agent.log" & pids+=($!)
    for _ in $(seq 600); do
      [ "$(curl -sf "$api/v1/hosts" -H "authorization: Bearer $jwt" | json "[0]['status']")" = online ] && break
      sleep 0.1
    done

    key=$(curl -sf "$api/v1/api-keys" -H "authorization: Bearer $jwt" -H 'content-type: application/json' \
      -d '{"name":"dev"}' | json "['key']")
    say "creating a sandbox (the agent waits until envd answers inside the VM)"
    for _ in $(seq 300); do grep -q "agent API listening" "$dev/agent.log" && break; sleep 0.1; done
    id=$(curl -sf "$api/v1/capsules" -H "x-api-key: $key" -H 'content-type: application/json' \
      -d '{"template":"minimal","vcpus":1,"memory_mb":256}' | json "['id']")
    say "running code in $id"
    curl -sf "$api/v1/capsules/$id/exec" -H "x-api-key: $key" -H 'content-type: application/json' \
      -d '{"cmd":"echo","args":["hello from a microVM"]}' | json "['stdout']" | tr -d '\n'; echo

    cat <<EOT

    API key:   $key
    Sandbox:   $id
    Logs:      $dev/cp.log, $dev/agent.log

    curl -s $api/v1/capsules -H 'x-api-key: $key'
    curl -s $api/v1/capsules/$id/exec -H 'x-api-key: $key' -H 'content-type: application/json' \\
      -d '{"cmd":"uname","args":["-a"]}'
    curl -s -X POST $api/v1/capsules -H 'x-api-key: $key' -H 'content-type: application/json' \\
      -d '{"template":"minimal"}'
    curl -s -X DELETE $api/v1/capsules/$id -H 'x-api-key: $key'

    Port proxy: http://<port>-<capsule id>.localhost:$cp_port/ with the same X-API-Key
    (SDKs: WRENN_PROXY_DOMAIN=localhost:$cp_port)
    EOT
    if [ "${WRENN_DEV_ONESHOT:-0}" = 1 ]; then exit 0; fi
    say "running; Ctrl-C stops the stack and removes its sandboxes"
    wait
