// Wrapper module for kube-apiserver, kube-controller-manager and kubectl, built from the
// published k8s.io/kubernetes module. It does NOT build as checked in: k8s.io/kubernetes
// requires its ~30 staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and
// replaces them with ./staging/src/...; hack/k8s-bins.sh copies this module to a build
// folder outside the repo and adds, for every `=> ./staging/src/k8s.io/<m>` line of
// k8s.io/kubernetes's own go.mod, `go mod edit -replace k8s.io/<m>=k8s.io/<m>@v0.Y.Z`.
// The k8s.io/kubernetes version below is the single source of truth for the cache key.
module datasync.local/tests/k8s/kube

go 1.26.0

tool (
	k8s.io/kubernetes/cmd/kube-apiserver
	k8s.io/kubernetes/cmd/kube-controller-manager
	k8s.io/kubernetes/cmd/kubectl
)

require k8s.io/kubernetes v1.37.2
