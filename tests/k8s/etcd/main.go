// Command etcd is upstream's server entry point (go.etcd.io/etcd/server/v3/main.go).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
