// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3/etcdmain), built at the
// version the Kubernetes release in go.mod requires. It takes etcd's usual flags.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
