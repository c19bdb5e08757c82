"""Generated CSI v1.12 protobuf and gRPC modules (scripts/gen_proto.py; never edit by hand)."""
