#!/usr/bin/env bash
# Install cxr-node on a Debian host, without Docker, next to Orthanc from apt.
#
#   sudo scripts/install-host.sh                 # the real thing (as root)
#   scripts/install-host.sh --destdir /tmp/root  # into a staging root: no user, no chown,
#                                                # no apt, no systemctl (tests do this)
#
# What it does (README, "Bare-metal install (Debian, no Docker)"):
#   - the system user cxr-node (no login, no home of its own);
#   - a virtual environment in $PREFIX/venv (default /opt/cxr-node) with CPU torch and this
#     repository's node; /usr/local/bin/cxr-node links to its command;
#   - /etc/cxr-node/node.toml from deploy/node.toml (an existing one is kept);
#   - /var/lib/cxr-node/{spool,models}, 0700, owned by cxr-node;
#   - /etc/systemd/system/cxr-node.service from deploy/cxr-node.service (not started);
#   - unless --no-orthanc: Orthanc from apt, /etc/orthanc/orthanc.json from
#     deploy/orthanc-host.json (the previous one kept as orthanc.json.before-cxr-node), this
#     repository's Lua scripts, and /etc/orthanc/credentials.json with a generated password
#     (0600, readable by Orthanc alone). An existing credentials file is kept. Without that
#     file Orthanc lets nobody in: it holds the only registered user.
#
# Options (or the environment variables in brackets):
#   --destdir DIR   staging root [DESTDIR]
#   --prefix DIR    where the venv goes [PREFIX, default /opt/cxr-node]
#   --python PY     the interpreter the venv is made from [PYTHON, default python3, >= 3.11]
#   --no-orthanc    install the node only (Orthanc elsewhere: edit node.toml's [destination])
# [TORCH_INDEX_URL] where torch comes from (default: the CPU wheels);
# [TORCH_SPEC] the pinned torch/torchvision; [PIP_INSTALL_ARGS] extra pip options.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/cxr-node}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PIP_INSTALL_ARGS="${PIP_INSTALL_ARGS:-}"
ORTHANC=1
USER_NAME=cxr-node
ORTHANC_LOGIN=cxr-admin

say() { printf '[install-host] %s\n' "$*"; }
die() { printf '[install-host] error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) DESTDIR="${2:?--destdir needs a folder}"; shift 2 ;;
    --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --no-orthanc) ORTHANC=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (--help lists them)" ;;
  esac
done

R="${DESTDIR%/}"      # every path below is "$R/..."
REAL=0                # 1: the host itself (user, ownership, apt, systemctl)
if [ -z "$R" ]; then
  [ "$(id -u)" -eq 0 ] || die "run as root (sudo), or give --destdir for a staging root"
  REAL=1
fi
VENV="$PREFIX/venv"

# -- user ----------------------------------------------------------------------------------
if [ "$REAL" -eq 1 ]; then
  if ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/cxr-node --no-create-home \
      --shell /usr/sbin/nologin "$USER_NAME"
    say "user $USER_NAME created"
  fi
else
  say "staging root $R: no user, no chown, no apt, no systemctl"
fi

own() {  # own USER:GROUP PATH...: only on the host itself
  local who="$1"; shift
  if [ "$REAL" -eq 1 ]; then chown "$who" "$@"; fi
}

# -- the node in a venv --------------------------------------------------------------------
install -d -m 0755 "$R$PREFIX" "$R/usr/local/bin"
if [ ! -x "$R$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$R$VENV"
fi
# shellcheck disable=SC2086  # PIP_INSTALL_ARGS and TORCH_SPEC are lists of words
"$R$VENV/bin/python" -m pip install -q $PIP_INSTALL_ARGS --index-url "$TORCH_INDEX_URL" $TORCH_SPEC
# shellcheck disable=SC2086
"$R$VENV/bin/python" -m pip install -q $PIP_INSTALL_ARGS "$SRC"
install -m 0644 "$SRC/README.md" "$R$PREFIX/README.md"
ln -sfn "$VENV/bin/cxr-node" "$R/usr/local/bin/cxr-node"
say "cxr-node $("$R$VENV/bin/cxr-node" --version 2>&1 | tail -1) in $VENV; /usr/local/bin/cxr-node"

# -- configuration, state, unit --------------------------------------------------------------
install -d -m 0755 "$R/etc/cxr-node"
if [ -e "$R/etc/cxr-node/node.toml" ]; then
  say "/etc/cxr-node/node.toml exists: kept (compare with deploy/node.toml)"
else
  install -m 0640 "$SRC/deploy/node.toml" "$R/etc/cxr-node/node.toml"
  own "root:$USER_NAME" "$R/etc/cxr-node/node.toml"
fi
install -d -m 0700 "$R/var/lib/cxr-node" "$R/var/lib/cxr-node/spool" "$R/var/lib/cxr-node/models"
own "$USER_NAME:$USER_NAME" "$R/var/lib/cxr-node" "$R/var/lib/cxr-node/spool" \
  "$R/var/lib/cxr-node/models"
install -d -m 0755 "$R/etc/systemd/system"
install -m 0644 "$SRC/deploy/cxr-node.service" "$R/etc/systemd/system/cxr-node.service"
if [ "$REAL" -eq 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

# -- Orthanc --------------------------------------------------------------------------------
new_secret() {  # 32 random bytes, URL-safe base64; refuses rather than a weak secret
  local s
  s="$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')" || return 1
  [ "${#s}" -ge 40 ] || return 1
  printf '%s' "$s"
}

if [ "$ORTHANC" -eq 1 ]; then
  if [ "$REAL" -eq 1 ] && [ ! -x /usr/sbin/Orthanc ]; then
    say "installing Orthanc and dcmtk with apt-get ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc dcmtk
  fi
  install -d -m 0755 "$R/etc/orthanc"
  if [ -e "$R/etc/orthanc/orthanc.json" ] && [ ! -e "$R/etc/orthanc/orthanc.json.before-cxr-node" ]; then
    mv "$R/etc/orthanc/orthanc.json" "$R/etc/orthanc/orthanc.json.before-cxr-node"
  fi
  install -m 0644 "$SRC/deploy/orthanc-host.json" "$R/etc/orthanc/orthanc.json"
  for lua in refuse-empty-credentials.lua route-to-node.lua; do
    install -m 0644 "$SRC/config/$lua" "$R/etc/orthanc/$lua"
  done
  creds="$R/etc/orthanc/credentials.json"
  if [ -e "$creds" ]; then
    say "/etc/orthanc/credentials.json exists: kept"
  else
    secret="$(new_secret)" || die "cannot generate a password: Orthanc is left without users"
    (umask 077 && printf '{\n  "RegisteredUsers": { "%s": "%s" }\n}\n' \
      "$ORTHANC_LOGIN" "$secret" >"$creds.tmp")
    chmod 0600 "$creds.tmp"
    mv "$creds.tmp" "$creds"
    say "Orthanc login: user $ORTHANC_LOGIN, its password in /etc/orthanc/credentials.json (0600)"
  fi
  if [ "$REAL" -eq 1 ]; then
    getent passwd orthanc >/dev/null && own orthanc:orthanc "$creds"
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      systemctl restart orthanc
    fi
  fi
fi

cat <<EOF
[install-host] done. Next:
  1. copy the weights file into /var/lib/cxr-node/models (README, "Model weights")
  2. edit /etc/cxr-node/node.toml: report.uid_root (README, "Go-live checklist")
  3. runuser -u $USER_NAME -- cxr-node check --config /etc/cxr-node/node.toml
  4. systemctl enable --now cxr-node; journalctl -u cxr-node -f
EOF
