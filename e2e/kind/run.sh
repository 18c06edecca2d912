#!/usr/bin/env bash
# End-to-end run on a kind cluster: create the cluster, build and load the images, install the
# dev databases, the operator and the sample's Secrets and migrations, then run the Rust suite.
#   e2e/kind/run.sh            # everything
#   KEEP_CLUSTER=1 e2e/kind/run.sh   # leave the cluster up afterwards for debugging
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-widgets-e2e}
TAG=${TAG:-e2e}
RUNTIME_IMAGE=widget-runtime:$TAG
OPERATOR_IMAGE=widget-operator:$TAG
export KUBECONFIG=${KUBECONFIG:-$PWD/target/kind-$CLUSTER.kubeconfig}

need() { command -v "$1" >/dev/null || { echo "missing tool: $1" >&2; exit 2; }; }
need kind; need kubectl; need docker; need cargo

cleanup() {
  status=$?
  if [ $status -ne 0 ]; then
    echo "--- diagnostics" >&2
    kubectl get widgetpipelines,deployments,pods -A -o wide >&2 || true
    kubectl -n widgets get widgetpipeline home -o yaml >&2 || true
    kubectl -n widget-system logs deploy/widget-operator --tail=200 >&2 || true
    kubectl -n widgets get events --sort-by=.lastTimestamp >&2 || true
  fi
  if [ -z "${KEEP_CLUSTER:-}" ]; then kind delete cluster --name "$CLUSTER" || true; fi
  exit $status
}
trap cleanup EXIT

mkdir -p target
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --kubeconfig "$KUBECONFIG"

docker build -f docker/Dockerfile --target widget-runtime -t "$RUNTIME_IMAGE" .
docker build -f docker/Dockerfile --target widget-operator -t "$OPERATOR_IMAGE" .
kind load docker-image --name "$CLUSTER" "$RUNTIME_IMAGE" "$OPERATOR_IMAGE"

# Dev Postgres and Redis.
kubectl apply -k manifests/dev
kubectl -n widgets-dev rollout status deploy/postgres deploy/redis --timeout=180s

# The operator (CRD, RBAC, Deployment) with the freshly built image.
kubectl kustomize manifests/operator \
  | sed "s#image: ghcr.io/example/widget-operator:0.1.0#image: $OPERATOR_IMAGE#" \
  | kubectl apply --server-side -f -
kubectl wait --for=condition=Established crd/widgetpipelines.homewidgets.io --timeout=60s
kubectl -n widget-system rollout status deploy/widget-operator --timeout=180s

# Namespace, Secrets and migrations of the sample (the test applies the pipeline itself).
kubectl apply -f manifests/samples/namespace.yaml -f manifests/samples/secrets.yaml
sed "s#ghcr.io/example/widget-runtime:0.1.0#$RUNTIME_IMAGE#" manifests/samples/migrations.yaml | kubectl apply -f -
kubectl -n widgets wait --for=condition=complete job/migrate-core job/migrate-deals --timeout=180s

WIDGET_E2E=1 WIDGET_RUNTIME_IMAGE=$RUNTIME_IMAGE cargo test -p widget-e2e -- --nocapture

# The kstatus view a GitOps tool uses.
kubectl -n widgets wait --for=condition=Ready widgetpipeline/home --timeout=120s
kubectl -n widgets get wp
