"""Local development stack: real kube-apiserver, etcd, NATS, Redis and Postgres on loopback."""
