// Wrapper module for the etcd server (built by hack/k8s-bins.sh; go.sum is generated there).
// etcd's own server module cannot be `go install`ed (relative replace lines), but as a
// dependency its replaces are ignored and the published v3.6.x modules are used.
module datasync.local/tests/k8s/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.6.16
