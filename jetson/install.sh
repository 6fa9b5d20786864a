#!/usr/bin/env bash
# Install the ct-edge device runtime on an NVIDIA Jetson (JetPack 5 or 6). Idempotent: re-running
# skips what is already in place and upgrades the project itself.
#
#   sudo jetson/install.sh [--prefix /opt/ct-edge] [--user ct-edge] [--src DIR] [--enable]
#
# What it does:
#   1. reads the L4T release from /etc/nv_tegra_release: R35 = JetPack 5 (TensorRT 8.5, Python 3.8),
#      R36 = JetPack 6 (TensorRT 10.x, Python 3.10); anything else is refused;
#   2. apt: TensorRT Python bindings (python3-libnvinfer, -dev), venv and build tools;
#   3. a system user for the service, in the groups that own the GPU device nodes;
#   4. a venv with --system-site-packages, so the apt TensorRT bindings are importable in it;
#   5. pycuda built from source against /usr/local/cuda (no aarch64 wheels exist);
#   6. the project, without the offline toolchain (no torch on the device);
#   7. the systemd unit (jetson/edge.service) with this prefix; --enable also enables and starts it.
set -euo pipefail

PREFIX=/opt/ct-edge
SERVICE_USER=ct-edge
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENABLE=0
CONFIG_DIR=/etc/ct-edge
STATE_DIR=/var/lib/ct-edge
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="$2"; shift 2 ;;
        --user) SERVICE_USER="$2"; shift 2 ;;
        --src) SRC="$(cd "$2" && pwd)"; shift 2 ;;
        --enable) ENABLE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[ct-edge install] %s\n' "$*"; }
die() { printf '[ct-edge install] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ...)"
[ -f "$SRC/pyproject.toml" ] || die "$SRC is not the ct-edge source tree (no pyproject.toml); pass --src DIR"

# -- 1. JetPack version -------------------------------------------------------------------------
[ -r /etc/nv_tegra_release ] || die "/etc/nv_tegra_release not found: this is not a Jetson running L4T"
L4T_MAJOR="$(sed -n 's/^# R\([0-9]\+\) (release).*/\1/p' /etc/nv_tegra_release | head -n1)"
L4T_REVISION="$(sed -n 's/.*REVISION: \([0-9.]\+\).*/\1/p' /etc/nv_tegra_release | head -n1)"
case "$L4T_MAJOR" in
    35) JETPACK=5 ;;
    36) JETPACK=6 ;;
    "") die "cannot read the L4T release from /etc/nv_tegra_release: $(head -n1 /etc/nv_tegra_release)" ;;
    *) die "L4T R$L4T_MAJOR is not supported: need JetPack 5 (L4T R35, TensorRT 8.5) or JetPack 6 (L4T R36)" ;;
esac
log "L4T R$L4T_MAJOR.$L4T_REVISION: JetPack $JETPACK"

# -- 2. apt packages ------------------------------------------------------------------------------
PACKAGES=(python3-venv python3-dev python3-pip build-essential python3-libnvinfer python3-libnvinfer-dev)
MISSING=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || MISSING+=("$pkg")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
    log "apt install ${MISSING[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${MISSING[@]}"
else
    log "apt packages present"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no CUDA toolkit at $CUDA_HOME (install JetPack's CUDA: apt install nvidia-jetpack, or set CUDA_HOME)"
python3 -c 'import tensorrt' 2>/dev/null || die "system python3 cannot import tensorrt after installing python3-libnvinfer"
log "system TensorRT $(python3 -c 'import tensorrt; print(tensorrt.__version__)'), CUDA at $CUDA_HOME"

# -- 3. service user ----------------------------------------------------------------------------
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi
# Jetson GPU nodes (/dev/nvhost-*, /dev/nvmap) belong to group video; render exists on newer L4T.
for group in video render; do
    if getent group "$group" >/dev/null; then usermod -a -G "$group" "$SERVICE_USER"; fi
done
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR"
install -d -m 0755 "$CONFIG_DIR"

# -- 4. venv that sees the apt TensorRT bindings ------------------------------------------------
VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV (--system-site-packages)"
    install -d -m 0755 "$PREFIX"
    python3 -m venv --system-site-packages "$VENV"
fi
grep -q '^include-system-site-packages = true' "$VENV/pyvenv.cfg" \
    || die "$VENV exists without --system-site-packages: remove it and re-run"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel

# -- 5. pycuda from source against this CUDA -----------------------------------------------------
if "$VENV/bin/python" -c 'import pycuda.driver' 2>/dev/null; then
    log "pycuda present: $("$VENV/bin/python" -c 'import pycuda; print(pycuda.VERSION_TEXT)')"
else
    log "building pycuda from source against $CUDA_HOME (several minutes)"
    PATH="$CUDA_HOME/bin:$PATH" CUDA_ROOT="$CUDA_HOME" \
        "$VENV/bin/python" -m pip install --no-binary pycuda "pycuda>=2022.1"
fi

# -- 6. the project (device runtime only: no toolchain extra) ------------------------------------
log "installing ct-edge from $SRC"
"$VENV/bin/python" -m pip install --quiet --upgrade "$SRC"

"$VENV/bin/python" - <<'PY' || die "the venv cannot import the GPU stack"
import tensorrt, pycuda, pycuda.driver as driver
import edge
driver.init()
dev = driver.Device(0)
print(f"[ct-edge install] venv: TensorRT {tensorrt.__version__}, pycuda {pycuda.VERSION_TEXT}, "
      f"{dev.name()} sm {'.'.join(map(str, dev.compute_capability()))}, "
      f"integrated={bool(dev.get_attribute(driver.device_attribute.INTEGRATED))}")
PY

# -- 7. systemd unit ------------------------------------------------------------------------------
UNIT=/etc/systemd/system/ct-edge.service
sed -e "s#/opt/ct-edge#$PREFIX#g" -e "s#^User=.*#User=$SERVICE_USER#" -e "s#^Group=.*#Group=$SERVICE_USER#" \
    "$SRC/jetson/edge.service" > "$UNIT.new"
if ! cmp -s "$UNIT.new" "$UNIT" 2>/dev/null; then
    mv "$UNIT.new" "$UNIT"
    systemctl daemon-reload
    log "installed $UNIT"
else
    rm -f "$UNIT.new"
fi
if [ ! -f "$CONFIG_DIR/edge.toml" ]; then
    log "note: write $CONFIG_DIR/edge.toml before starting the service (see the project README)"
fi
if [ "$ENABLE" -eq 1 ]; then
    systemctl enable --now ct-edge.service
    log "ct-edge.service enabled and started: journalctl -u ct-edge -f"
fi
log "done. Power mode and clocks: see $SRC/jetson/README.md (nvpmodel, jetson_clocks)"
