"""The CSI gRPC services: spec rules here, storage work in the backends."""
