// Wrapper module for helm v3 (built by hack/k8s-bins.sh; go.sum is generated there).
module datasync.local/tests/k8s/helm

go 1.26.0

tool helm.sh/helm/v3/cmd/helm

require helm.sh/helm/v3 v3.22.0
