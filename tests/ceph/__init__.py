"""A real single-node Ceph cluster for the RBD backend's tests (see cluster.py)."""
