// Wrapper module for kwok (built by hack/k8s-bins.sh; go.sum is generated there).
module datasync.local/tests/k8s/kwok

go 1.26.0

tool sigs.k8s.io/kwok/cmd/kwok

require sigs.k8s.io/kwok v0.8.0
