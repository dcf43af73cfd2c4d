#!/usr/bin/env bash
# Brings a Debian machine to the point where bacq runs, and is safe to run again (each step checks first):
#   1. system packages (Docker Engine, busybox-static, debootstrap, tmux, python3-venv, chromium)
#   2. a Docker daemon that answers (started here when none does)
#   3. kubo: `ipfs` from PATH, else the pinned release built once with Go into a cache outside the repo
#   4. the Python venv in .venv with bacq and its dev tools
#   5. the local test images bacq-test/busybox, bacq-test/debian:bookworm and bacq-test/systemd:bookworm
#      (no registry needed)
# Needs root (or sudo) for steps 1, 2 and 5.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KUBO_VERSION=${BACQ_KUBO_VERSION:-v0.28.0}   # the kubo RPC API that aioipfs 0.7.1 is written against
CACHE=${BACQ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bacq}
# debootstrap's mirror: BACQ_DEBIAN_MIRROR, else the first Debian archive this machine's apt uses.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
    done | head -n 1
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i !~ /security/) print $i; break } }' "$f"
    done | head -n 1
}
MIRROR=${BACQ_DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

mkdir -p "$CACHE"

# -- 1. system packages ------------------------------------------------------------------------
want=()
command -v dockerd >/dev/null 2>&1 || want+=(docker.io)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && ldd /bin/busybox 2>&1 | grep -q "not a dynamic" \
    || want+=(busybox-static)
command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
command -v tmux >/dev/null 2>&1 || want+=(tmux)
command -v chromium >/dev/null 2>&1 || want+=(chromium)   # the docs site's browser test
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || want+=(python3-venv)
if [ ${#want[@]} -gt 0 ]; then
    say "installing Debian packages: ${want[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${want[@]}" >/dev/null
fi
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "bacq needs Python >= 3.11; $(python3 --version) found"

# -- 2. Docker daemon --------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    say "no Docker daemon answers; starting dockerd"
    if [ -d /run/systemd/system ] && $SUDO systemctl start docker 2>/dev/null; then
        :
    else
        $SUDO sh -c 'nohup dockerd >/var/log/bacq-dockerd.log 2>&1 &'
    fi
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || die "dockerd did not come up; see /var/log/bacq-dockerd.log"
fi

# -- 3. kubo -----------------------------------------------------------------------------------
KUBO_BIN="$CACHE/kubo-$KUBO_VERSION/ipfs"
if command -v ipfs >/dev/null 2>&1; then
    say "using ipfs from PATH: $(ipfs version)"
elif [ -x "$KUBO_BIN" ]; then
    say "using cached kubo $KUBO_VERSION at $KUBO_BIN"
else
    command -v go >/dev/null 2>&1 || die "no ipfs on PATH and no Go toolchain to build kubo $KUBO_VERSION"
    say "building kubo $KUBO_VERSION with $(go version) (once; cached in $CACHE)"
    mkdir -p "$(dirname "$KUBO_BIN")"
    if ! GOBIN="$(dirname "$KUBO_BIN")" GOFLAGS=-mod=mod go install "github.com/ipfs/kubo/cmd/ipfs@$KUBO_VERSION"; then
        # go install refuses modules whose go.mod has replace/exclude directives: build from a
        # throwaway module that requires this kubo version instead.
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        (cd "$tmp" && go mod init bacq.invalid/kubo-build >/dev/null 2>&1 \
            && go get "github.com/ipfs/kubo@$KUBO_VERSION" \
            && go build -o "$KUBO_BIN" github.com/ipfs/kubo/cmd/ipfs) \
            || die "building kubo $KUBO_VERSION failed"
    fi
    "$KUBO_BIN" version >/dev/null || die "the kubo build at $KUBO_BIN does not run"
fi

# -- 4. Python venv ----------------------------------------------------------------------------
VENV="$ROOT/.venv"
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
stamp="$VENV/.bacq-installed"
want_stamp=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_stamp" ]; then
    say "installing bacq and its dev tools into $VENV"
    log="$VENV/.bacq-install.log"
    { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e "$ROOT[dev]"; } >"$log" 2>&1 \
        || { tail -30 "$log" >&2; die "pip install failed (whole log: $log)"; }
    echo "$want_stamp" > "$stamp"
fi

# -- 5. local test images ----------------------------------------------------------------------
if ! docker image inspect bacq-test/busybox:latest >/dev/null 2>&1; then
    say "building image bacq-test/busybox from Debian's busybox-static"
    tree=$(mktemp -d)
    mkdir -p "$tree/bin" "$tree/tmp" "$tree/etc" "$tree/root"
    cp /bin/busybox "$tree/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$tree/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$tree/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$tree/etc/group"
    chmod 1777 "$tree/tmp"
    tar -C "$tree" -c . | docker import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' \
        - bacq-test/busybox:latest >/dev/null
    rm -rf "$tree"
fi
if ! docker image inspect bacq-test/debian:bookworm >/dev/null 2>&1; then
    rootfs_tar="$CACHE/debian-bookworm-minbase.tar"
    if [ ! -s "$rootfs_tar" ]; then
        say "building a Debian bookworm minbase tree with debootstrap (once; cached in $CACHE)"
        [ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list*; set BACQ_DEBIAN_MIRROR"
        tree=$(mktemp -d)
        $SUDO debootstrap --variant=minbase bookworm "$tree" "$MIRROR" >/dev/null \
            || die "debootstrap from $MIRROR failed (set BACQ_DEBIAN_MIRROR to a reachable mirror)"
        $SUDO tar -C "$tree" -c . > "$rootfs_tar.part" && mv "$rootfs_tar.part" "$rootfs_tar"
        $SUDO rm -rf "$tree"
    fi
    say "importing image bacq-test/debian:bookworm"
    docker import --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$rootfs_tar" bacq-test/debian:bookworm >/dev/null
fi

if ! docker image inspect bacq-test/systemd:bookworm >/dev/null 2>&1; then
    say "building image bacq-test/systemd:bookworm (systemd as PID 1, for tests/test_systemd.py)"
    docker build -q -t bacq-test/systemd:bookworm "$ROOT/tests/systemd" >/dev/null \
        || die "building bacq-test/systemd:bookworm failed (apt inside the image uses the host's sources)"
fi

say "ready: docker $(docker version -f '{{.Server.Version}}'), kubo at $(command -v ipfs || echo "$KUBO_BIN")"
